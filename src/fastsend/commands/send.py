"""``fastsend send CAMPAIGN.toml --recipients FILE``: spool a campaign and deliver it.

Validates everything before the first message leaves: the campaign (template,
variables against the recipient columns, DKIM for the From domain unless
--no-dkim, a spec that fits a worker's ring), and every recipient row (bad
rows are reported with their line number; with --strict nothing is sent if
any row is bad). Then the list is accepted through :mod:`fastsend.accept` as a
durable ingest job (per-tenant suppression, accepted/suppressed events), in
chunks while the engine already delivers, until every recipient is final or
deferred past --max-wait. Killed in the middle, ``fastsend resume`` continues
the ingest where its last committed chunk ended.
Exit status: 0 when all went as far as it can, 1 when bad rows were skipped or
the list could not be read to its end, 75 with --fail-deferred when mail is still
deferred at the end, 2 on unusable input, 128 + the signal's
number when a SIGTERM (143), SIGHUP (129: drained as for SIGTERM) or SIGINT
(130) stopped it (what is left and the
``fastsend resume`` command that continues are printed).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from fastsend.commands.common import (
    EX_TEMPFAIL,
    RUN_OPTION,
    abandon_empty_sends,
    add_engine_arguments,
    die,
    engine_config,
    foreign_source_ips,
    hold_source_ips,
    hold_supervisor,
    open_suppression,
    print_summary,
    redact_url,
    run_engine,
    run_options,
    sign_links_as_serve,
    still_deferred,
    stopped_by_signal,
    stopped_by_storage,
)

# Everything run() opens is closed when it returns, and it leaves no thread:
# the process may exit without the interpreter's teardown (cli.run_process).
EXIT_AT_ONCE = True
# What run() imports beyond the options (the cli imports them first, see cli.main).
RUN_IMPORTS = (
    "fastsend.engine",
    "fastsend.delivery.worker",  # forked workers run it: imported before the fork
    "fastsend.accept",
    "fastsend.events",
    "fastsend.message",
    "fastsend.spool",
    "fastsend.suppression",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("campaign", help="campaign file (TOML)")
    p.add_argument("--recipients", "-r", required=True, help="CSV (header row) or JSON lines")
    p.add_argument("--strict", action="store_true", help="send nothing if any row is bad")
    p.add_argument("--no-dkim", action="store_true", help="allow a From domain without DKIM")
    p.add_argument("--name", default="", help="campaign name (default: the file name)")
    # None: the default tenant (fastsend.suppression.DEFAULT_TENANT, not imported for --help)
    p.add_argument("--tenant", help="the campaign's tenant (its suppression list)")
    p.add_argument(
        "--pool",
        help="the [pools] pool this campaign's mail leaves from (default: its tenant's, else"
        " the default pool)",
    )
    p.add_argument(
        "--max-rate",
        type=float,
        metavar="N",
        help="caps this campaign's dispatch, messages a second (never above [shaping.dispatch]"
        " campaign_rate)",
    )
    p.add_argument(
        "--priority",
        type=int,
        metavar="N",
        help="this campaign's mail is claimed before its tenant's campaigns of a lower"
        " priority (-100..100; default 0, transactional mail 1); other tenants keep their share",
    )
    p.add_argument(
        "--weight",
        type=int,
        metavar="N",
        help="its share of the claims among its tenant's campaigns of the same priority"
        " (1..1000, default 1)",
    )
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="send a row whose address an earlier row has (default: each address once;"
        " the domain's case and surrounding spaces do not make another address)",
    )
    add_engine_arguments(p)


def campaign_options(args: argparse.Namespace, cfg: Any) -> tuple[dict[str, Any], str]:
    """The campaign's own options (``pool``, ``max_rate``: what the
    supervisor's shaping reads; ``priority``, ``weight``: how the spool's
    claims share their room, spool/fair.py), or why they cannot be (a pool
    the config does not have would silently fall back to the default pool)."""
    from fastsend.spool.fair import check_rank

    options: dict[str, Any] = {}
    if args.keep_duplicates:  # (fastsend.accept.KEEP_DUPLICATES; not imported for --help)
        options["keep_duplicates"] = True
    wrong = check_rank(args.priority, args.weight)
    if wrong:
        return {}, f"--{wrong}"
    for opt in ("priority", "weight"):
        if getattr(args, opt) is not None:
            options[opt] = getattr(args, opt)
    if args.pool is not None:
        from fastsend.shaping.pools import load_pools

        pools = load_pools(cfg, time.time())
        names = sorted(pools.pools)
        if args.pool not in names:
            return {}, (
                f"--pool: no pool {args.pool!r} in the config (its pools: {', '.join(names)})"
            )
        tenant = "default" if args.tenant is None else args.tenant
        if not pools.may_use(args.pool, tenant):
            return {}, (
                f"--pool: pool {args.pool!r} is another tenant's ([pools] tenants);"
                f" tenant {tenant!r} may not send from it"
            )
        options["pool"] = args.pool
    if args.max_rate is not None:
        if not (args.max_rate > 0 and math.isfinite(args.max_rate)):
            return {}, f"--max-rate: {args.max_rate:g} is not a rate (messages a second > 0)"
        options["max_rate"] = args.max_rate
    return options, ""


def sent_before(spool: Any, spec: dict[str, Any], tenant: str, path: str) -> str:
    """Why this send is a run of one the spool already holds, cut short (a kill -9,
    a stop, a full disk: a job runner or a shell's history ran ``send`` again):
    the same campaign (spec and tenant) from the same list file (same bytes),
    its list not all read, or messages left in flight (a run killed: one that
    ended has none). Spooled again as a new campaign, every recipient already
    delivered would get it twice (the dedup is per campaign); ``resume``
    continues it. "" when it is not (a run that ended, deferred mail left or not,
    or a cancelled campaign: the same list again is a campaign of its own)."""
    import orjson

    from fastsend.accept import source_problem

    real = os.path.realpath(path)
    want = orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
    for job in sorted(spool.list_ingests(), key=lambda j: -j.id):
        if job.source.get("origin") == "api":
            continue
        if os.path.realpath(str(job.source.get("path", ""))) != real:
            continue
        info = spool.get_campaign(job.campaign)
        if info is None or info.status not in ("active", "paused") or info.tenant != tenant:
            continue
        if orjson.dumps(info.spec, option=orjson.OPT_SORT_KEYS) != want:
            continue
        inflight = 0 if not job.finished else spool.counts(info.id).get("inflight", 0)
        if job.finished and not inflight:
            # It ended (its list read, what was on the wire answered): the same list
            # again is a campaign of its own, deferred mail of the first or not.
            continue
        if source_problem(job) is not None:
            continue  # another list now, under the same name
        read = job.accepted + job.rejected + job.duplicates
        where = (f"{read:,} of {job.total:,} rows read" if not job.finished
                 else f"{inflight:,} message(s) in flight when it stopped")  # fmt: skip
        return (
            f"{path} was sent with this campaign before, by a run that did not finish"
            f" (campaign {info.id} {info.name!r}: {where}); `fastsend resume` continues it"
            " without sending any of it twice (as a new campaign every recipient already"
            f" delivered would get it again); to send it anew, `fastsend campaign cancel"
            f" {info.id}` first"
        )
    return ""


def run(args: argparse.Namespace) -> int:
    # The engine and what it needs, imported once the command runs (not for --help).
    from fastsend import engine, recipients
    from fastsend.accept import (
        FIRST_CHUNK,
        AcceptError,
        Acceptor,
        check_campaign,
        name_problem,
        row_checks,
        row_sizer,
        rows_left,
    )
    from fastsend.config import ConfigError
    from fastsend.events import EventLog
    from fastsend.faults import countdown
    from fastsend.message import Campaign, CampaignError
    from fastsend.spool import ABANDONED, SpoolError, open_spool
    from fastsend.suppression import DEFAULT_TENANT

    tenant = DEFAULT_TENANT if args.tenant is None else args.tenant
    # As the API and `apikey create` take them (`--tenant ''` or "a b" made a campaign
    # no key or suppression list could name; a line feed in --name forged a line of
    # `fastsend campaign list`)
    if args.tenant is not None:
        from fastsend.serve.auth import AuthError, check_tenant

        try:
            check_tenant(tenant)
        except AuthError as e:
            return die(f"--tenant: {e}")
    name = args.name or os.path.basename(args.campaign)
    if why := name_problem(name):
        return die(f"--name {name!r}: {why}" if args.name else f"{args.campaign}: its name: {why}")

    try:
        cfg, spool_url = engine_config(args)
    except ConfigError as e:
        return die(str(e))
    options, why = campaign_options(args, cfg)
    if why:
        return die(why)
    # Where and how its mail goes, for a `resume` after a crash (kill -9: no command said).
    options[RUN_OPTION] = run_options(args)
    if (foreign := foreign_source_ips(cfg)) is not None:
        return foreign
    try:
        camp = Campaign.load(args.campaign)
        tracked = bool((camp.to_dict().get("tracking") or {}).get("base_url"))
        if tracked:
            sign_links_as_serve(cfg)  # before its links are built, here and in the workers
        spec = check_campaign(
            camp, require_dkim=not args.no_dkim, max_size=cfg.delivery.max_message_size
        )
        camp.check_columns(recipients.columns(args.recipients) | {"email"})
    except FileNotFoundError:
        return die(f"campaign file {args.campaign!r} not found")
    except (CampaignError, AcceptError) as e:
        msg = str(e)  # (one that names the file already: not twice, "c.toml: c.toml: ...")
        named = msg.startswith(f"{args.campaign}:") or f"campaign {args.campaign}:" in msg
        return die(msg if named else f"{args.campaign}: {msg}")
    except recipients.RecipientsError as e:
        return die(str(e))

    bad: list[recipients.BadRow] = []

    def on_bad(row: recipients.BadRow) -> None:
        bad.append(row)
        print(f"fastsend: {args.recipients}: {row} (skipped)", file=sys.stderr)

    try:
        if args.strict:
            # The rows the ingest would refuse: also those whose message would be
            # too big or whose Reply-To/To could not be written (they had been
            # skipped with the rest sent, --strict or not).
            refuse, need = row_checks(spec)
            sizer = row_sizer(spec, cfg.delivery.max_message_size)
            bad = []
            for r in recipients.read(args.recipients, refuse=refuse, need=need):
                if sizer is not None and not isinstance(r, recipients.BadRow):
                    too_big = sizer(r[3])
                    r = r if too_big is None else recipients.BadRow(r[0], too_big)
                if isinstance(r, recipients.BadRow):
                    bad.append(r)
            if bad:
                for b in bad[:50]:
                    print(f"fastsend: {args.recipients}: {b}", file=sys.stderr)
                return die(f"{len(bad)} bad recipient row(s); nothing was sent (--strict)", 1)
        spool = open_spool(spool_url)
    except SpoolError as e:
        return die(str(e), e.exit_status)  # (a Redis that does not answer: 75)
    except recipients.RecipientsError as e:
        return die(str(e))
    busy = hold_supervisor(spool, "fastsend send", cfg.spool_dir)  # before anything is spooled
    if busy:
        return busy
    try:
        abandon_empty_sends(spool)
        again = sent_before(spool, spec, tenant, args.recipients)
    except spool.outage_errors() as e:
        spool.close()
        return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
    if again:
        spool.close()
        return die(again)
    ips = hold_source_ips(spool, cfg)  # a shared spool: no other live node's IP
    if isinstance(ips, int):
        spool.close()
        return ips
    try:
        sign_links_as_serve(cfg, spool, links=tracked)  # serve's: links, VERP, ids verify
    except spool.outage_errors() as e:
        spool.close()
        return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
    events = EventLog(cfg.event_log_path)
    # Before the first chunk's accepted events: the rollups count them as they happen.
    rollups = engine.attach_rollups(cfg, spool, events)
    suppression = open_suppression(spool_url, cfg.spool_dir)
    acceptor = Acceptor(spool, events, suppression, max_size=cfg.delivery.max_message_size)
    # Bad input, or a shared spool out of reach before the first chunk is in.
    refused: tuple[type[BaseException], ...] = (
        recipients.RecipientsError,
        SpoolError,
        *spool.outage_errors(),
    )
    cid: int | None = None
    try:
        cid = acceptor.create_campaign(
            spec,
            name=name,
            tenant=tenant,
            options=options or None,
        )
        countdown({"send-kill-after-campaign": signal.SIGKILL})  # (tests)
        job = acceptor.start_ingest(cid, args.recipients)
        feed = acceptor.feed(job, on_bad=on_bad, first=FIRST_CHUNK)
        # The first chunk before the engine starts (file errors surface here);
        # the rest is read as the windows have room (paced by dispatch).
        mark = next(feed)
        if isinstance(mark, BaseException):  # the spool is out of reach already
            raise mark
    except refused as e:
        with contextlib.suppress(OSError):  # (its buffer on the same full disk, maybe)
            events.close()
        if rollups is not None:
            rollups.close()
        if ips is not None:
            with contextlib.suppress(Exception):
                ips.release()
        kept = False
        if cid is not None:  # a campaign with none of its list in: not left active, empty
            with contextlib.suppress(Exception):
                if not any(spool.counts(cid).values()):
                    spool.set_campaign_status(cid, ABANDONED)
                else:
                    kept = True
        # The first chunk's rows committed, then the event log's disk full (a
        # Redis spool's local dir): a traceback's one line, exit 75, no `resume`
        # command, so a job runner ran `send` again, a second campaign of the
        # same list. Said as any storage refusal (the rows and the list's place
        # are kept; resume tells their events and goes on).
        code = stopped_by_storage(e, spool_url) if kept else None
        if code is not None:
            return code
        temporary = isinstance(e, spool.outage_errors()) or getattr(e, "exit_status", 2) == EX_TEMPFAIL
        return die(str(e), EX_TEMPFAIL if temporary else 2)
    progress = [mark]

    def feeder() -> Iterator[BaseException | None]:
        for m in feed:
            if isinstance(m, BaseException):
                yield m  # an outage of the spool: the engine waits it out
                continue
            progress[0] = m
            yield None

    summary = run_engine(
        lambda: engine.run(
            cfg,
            spool,
            max_wait=args.max_wait,
            total=job.total - mark.rejected - mark.duplicates,
            progress=not args.no_progress,
            campaign=cid,
            # Always: after the last chunk the feed still marks the job done (a list of
            # exactly one chunk would otherwise be left unfinished, for `resume`).
            feeder=feeder(),
            # The list's good rows: it is read as the windows have room, so the
            # rows spooled so far are not the whole run.
            total_fn=lambda: job.total - progress[0].rejected - progress[0].duplicates,
            events=events,
            # A shared spool's list (Redis: every node's) for dispatch and hard bounces.
            suppression=suppression if spool.shared() is not None else None,
            cluster=ips,
            rollups=rollups,
        ),
        spool_url,
        events,
        suppression,
    )
    if isinstance(summary, int):  # the spool's storage refused a write (said): 75
        return summary
    job_now = spool.get_ingest(job.id) or job
    code = 0
    if summary.get("feed_error") or (not job_now.finished and not summary.get("signal")):
        left = rows_left(job_now)
        print(
            f"fastsend: reading {args.recipients} stopped: {summary.get('feed_error') or 'stopped'};"
            f" {job_now.accepted} recipient(s) were spooled, {left} row(s) not yet;"
            " `fastsend resume` continues the list",
            file=sys.stderr,
        )
        code = 1
    summary["spool"] = redact_url(spool_url)  # no Redis password in the output
    summary["rejected_rows"] = len(bad)
    # Rows left out: an address an earlier row of the list has (--keep-duplicates sends them).
    summary["duplicates"] = job_now.duplicates
    summary["ingest"] = {"job": job.id, "rows": job.total, "left": rows_left(job_now)}
    print_summary(summary, args.json)
    spool.close()
    stopped = stopped_by_signal(summary, args, rows_left(job_now))
    if job_now.duplicates:
        print(
            f"fastsend: {job_now.duplicates:,} row(s) named an address an earlier row has:"
            " sent once (--keep-duplicates sends each)",
            file=sys.stderr,
        )
    if bad:
        print(f"fastsend: {len(bad)} bad recipient row(s) were skipped", file=sys.stderr)
    # Mail still deferred outranks bad rows (said above): what is left is for resume.
    return stopped or still_deferred(summary, args) or (1 if bad else code)
