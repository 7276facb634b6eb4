"""Options shared by ``send``, ``resume`` and ``demo``, and how they become a Config.

Adding the options imports nothing beyond argparse: ``fastsend send --help``
needs only them. What turns them into a Config, a spool or a summary is
imported by the function that does it (once the command runs, it is all
imported anyway)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastsend.sendruns import RUN_FLAGS, RUN_OPTION, run_flags

if TYPE_CHECKING:
    from fastsend.config import Config


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (TOML); flags override it")
    p.add_argument("--spool", help="spool directory (default ./spool or the config's)")
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="DOMAIN=HOST:PORT",
        help="static route bypassing MX, or transports (e.g. '*=ses:eu-west-1', 'x.org=smtp,relay1');"
        " '*' for every domain (repeatable)",
    )
    p.add_argument("--source-ip", help="comma-separated source IPs, split across workers")
    p.add_argument("--workers", type=int, help="worker processes (default: one per CPU core)")
    p.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="return when nothing is due within this many seconds (default 300)",
    )
    p.add_argument(
        "--fail-deferred",
        action="store_true",
        help="exit 75 (try again later) when any recipient is still deferred at the end"
        " (default: 0, the mail stays queued for `resume`)",
    )
    p.add_argument("--helo", help="EHLO name")
    p.add_argument("--nameserver", action="append", default=[], help="DNS server HOST:PORT")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument(
        "--retry",
        metavar="MIN,MAX,MAXAGE",
        help="backoff seconds: first retry, cap, maximum age (e.g. 300,4000,432000)",
    )


def build_config(args: argparse.Namespace) -> Config:
    from fastsend import config as cfgmod
    from fastsend.config import Config, ConfigError

    cfg = cfgmod.load(args.config) if args.config else Config()
    for w in cfg.warnings:
        print(f"fastsend: warning: {w}", file=sys.stderr)
    if args.spool:
        cfg.spool_dir = _spool_flag(args.spool)
        from fastsend.spool import is_redis_url, spool_local_dir

        if is_redis_url(args.spool):  # (not the config's [spool] url; its dir= the local dir)
            cfg.spool_url, cfg.spool_dir = args.spool, spool_local_dir(args.spool)
    for r in args.route:
        dom, sep, target = r.partition("=")
        if not sep or not dom:
            raise ConfigError(f"--route {r!r}: expected DOMAIN=HOST:PORT")
        key = cfgmod.route_key(dom.strip())
        if why := cfgmod.never_matches(key):
            raise ConfigError(f"--route {r!r}: {why}")
        cfg.routes[key] = cfg.route(target, f"--route {r!r}")
    if args.source_ip:
        cfg.source_ips = [
            cfgmod.validate_ip(ip, "--source-ip") for ip in args.source_ip.split(",") if ip.strip()
        ]
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError("--workers must be at least 1")
        cfg.workers = args.workers
    if args.helo:
        try:
            cfg.helo = cfgmod.validate_helo(args.helo, "--helo")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if args.nameserver:
        for ns in args.nameserver:
            try:
                cfgmod.parse_nameserver(ns)
            except ValueError as exc:
                raise ConfigError(f"--nameserver {exc}") from None
        cfg.dns.nameservers = list(args.nameserver)
    if args.retry:
        try:
            lo, hi, age = (float(x) for x in args.retry.split(","))
        except ValueError:
            raise ConfigError("--retry expects MIN,MAX,MAXAGE seconds") from None
        if not all(0 <= v < math.inf for v in (lo, hi, age)) or lo > hi:
            raise ConfigError(
                f"--retry {args.retry}: seconds >= 0, the first retry no later than the cap"
            )
        cfg.retry.min_backoff, cfg.retry.max_backoff, cfg.retry.max_age = lo, hi, age
    max_wait = getattr(args, "max_wait", 0.0)  # (a caller's own Namespace may lack it)
    if not 0 <= max_wait < math.inf:  # (-5 and nan were taken)
        raise ConfigError(f"--max-wait {max_wait:g}: seconds >= 0")
    return cfg


def engine_config(args: argparse.Namespace) -> tuple[Config, str]:
    """:func:`build_config` and the spool to open: a directory (SQLite) or a Redis
    URL (``--spool``, or the config's ``[spool] url``). ``cfg.spool_dir`` becomes
    the local directory, where events, the secret and local state live."""
    from fastsend.spool import spool_local_dir

    cfg = build_config(args)
    spool_url = cfg.spool_url or cfg.spool_dir
    if not cfg.spool_url:
        cfg.spool_dir = spool_local_dir(cfg.spool_dir)
    return cfg, spool_url


def open_suppression(spool_url: str, local_dir: str) -> Any:
    """The suppression list ``serve`` uses with this spool: on a shared (Redis)
    spool the one in Redis (every node's), else ``<dir>/suppression.db``, or
    None when there is none yet."""
    from fastsend.spool import is_redis_url
    from fastsend.suppression import SuppressionList

    if is_redis_url(spool_url):
        from fastsend.serve.shared_state import RedisSuppressionList, shared_store

        shared = shared_store(spool_url)
        assert shared is not None
        return RedisSuppressionList(shared.client, shared.prefix)
    path = os.path.join(local_dir, "suppression.db")
    return SuppressionList(path) if os.path.exists(path) else None


def print_summary(summary: dict[str, object], as_json: bool) -> None:
    from fastsend.procs import leave_hung_up_terminal

    leave_hung_up_terminal()  # a hangup stopped the run: say it where it can be read
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return
    keys = ("delivered", "deferred", "bounced", "suppressed", "expired")
    print("  ".join(f"{k} {summary[k]}" for k in keys))
    print(
        f"elapsed {summary['elapsed_s']} s, {summary['msgs_per_s']} msg/s,"
        f" {summary.get('attempts', 0)} attempts"
    )


def redact_url(url: str) -> str:
    """A spool URL fit to print: a Redis password as ``****`` (fastsend.redisurl)."""
    from fastsend.redisurl import redact_url as redact

    return redact(url)


def sign_links_as_serve(cfg: Any, spool: Any = None, *, links: bool = True) -> None:
    """The installation secret, as ``fastsend serve`` on the same spool has it, for
    this process and the workers it forks: ``[tracking] secret``, else the shared
    spool's (``ClusterNode.shared_secret``: every node's), else ``<spool>/secret.key``.
    It signs the tracking links (opens, clicks, unsubscribe), VERP return paths and
    Message-IDs of what ``send`` and ``resume`` deliver, which serve checks (a link
    clicked, an unsubscribe, an asynchronous bounce or complaint matched to its
    message). Without it ``send`` refused a campaign with tracking ("tracking needs a
    secret"), and on a Redis spool signed with its local directory's secret, which no
    serve node knows: the bounces of what it sent were never matched. ``spool``: the
    opened spool (None: before it is, for checking a campaign: a local secret).
    ``links``: a campaign of this run may have tracking links (else the tracking
    module is not imported: a plain send's start stays as lean as it was)."""
    from fastsend import msgid

    shared = spool.shared() if spool is not None else None
    if shared is not None and not cfg.tracking.secret:
        from fastsend.cluster import ClusterNode

        node = ClusterNode(shared.client, shared.prefix, shared.node, shared.lease)
        cfg.secret = node.shared_secret()
    elif not cfg.secret:
        cfg.secret = msgid.load_secret(cfg)  # the supervisor's own (it keeps a set one)
    if links:
        from fastsend.message.tracking import set_process_secret

        set_process_secret(cfg.secret)


def add_spool_arguments(p: argparse.ArgumentParser, *, default: str | None = "./spool") -> None:
    """``--spool`` and ``-c``: the commands that only read or change a spool (queue,
    campaign, suppress) find it as the others do, in the config's ``[spool]``: an
    operator of ``fastsend serve -c /etc/fastsend/fastsend.toml`` names the same file."""
    p.add_argument(
        "--spool",
        help="spool directory or redis:// URL (default: the config's, else"
        + (f" {default})" if default else " required)"),
    )
    p.add_argument("-c", "--config", help="config file (TOML): its [spool]")
    p.set_defaults(spool_default=default)


def _spool_flag(spool: str) -> str:
    """``--spool``'s value; ConfigError for a URL of a scheme no spool has
    (``redis+sentinel://``: it was taken for a directory of that name)."""
    from fastsend.config import ConfigError
    from fastsend.redisurl import foreign_url

    if (foreign := foreign_url(spool)) is not None:
        raise ConfigError(f"--spool: {foreign}")
    return spool


def spool_arg(args: argparse.Namespace) -> str:
    """The spool :func:`add_spool_arguments` names: ``--spool``, else the config's
    (``[spool] url``, else its dir), else the default; ConfigError when neither is
    given and there is no default, or the config is wrong."""
    from fastsend.config import ConfigError, load

    if args.spool:
        return _spool_flag(str(args.spool))
    if args.config:
        cfg = load(args.config)
        return cfg.spool_url or cfg.spool_dir
    if args.spool_default is None:
        raise ConfigError("give --spool DIR (or URL) or -c CONFIG")
    return str(args.spool_default)


def foreign_source_ips(cfg: Any) -> int | None:
    """2 (said) when a source IP of ``cfg`` is no address of this machine, before
    anything is spooled or claimed (:func:`fastsend.delivery.ehlo.foreign_ips`)."""
    from fastsend.delivery.ehlo import foreign_ips_error

    why = foreign_ips_error(cfg)
    return None if why is None else die(why)


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of this run that :data:`RUN_FLAGS` names, as `send` records them
    in its campaign's options (the config's path made absolute; {} when none was
    given: that too is recorded, a run by MX on embedded defaults)."""
    out: dict[str, Any] = {}
    for name in RUN_FLAGS:
        value = getattr(args, name, None)
        if value:
            out[name] = os.path.abspath(value) if name == "config" else value
    return out


def recorded_run(spool: Any) -> tuple[dict[str, Any] | None, list[int], str]:
    """The options the `send` runs of the campaigns ``spool`` still has mail or a
    list to read for were given (:data:`RUN_OPTION`): (the options, the campaigns, "")
    when they agree, (None, [], why) when campaigns still pending were sent with
    different ones, (None, [], "") when no pending campaign has any recorded (spooled
    by serve's API, by a fastsend before they were recorded, or nothing pending)."""
    import orjson

    reading = {j.campaign for j in spool.list_ingests(unfinished=True)}
    runs: dict[bytes, tuple[dict[str, Any], list[int]]] = {}
    for info in spool.list_campaigns():
        run = (info.options or {}).get(RUN_OPTION)
        if not isinstance(run, dict) or info.status not in ("active", "paused"):
            continue
        if info.id not in reading and not spool.pending_domains([info.id], limit=1):
            continue
        runs.setdefault(orjson.dumps(run, option=orjson.OPT_SORT_KEYS), (run, []))[1].append(
            info.id
        )
    if len(runs) > 1:
        said = "; ".join(
            f"campaign{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}: {run_flags(run)}"
            for run, ids in runs.values()
        )
        return None, [], (
            "the campaigns this spool still has mail for were sent with different options"
            f" ({said}); say which to resume with (-c, --route, --source-ip, --helo, --retry,"
            " --nameserver)"
        )
    if not runs:
        return None, [], ""
    ((run, ids),) = runs.values()
    return run, ids, ""


# A campaign of a shared spool is judged left empty by a dead `send` only this
# long after it was made (another node's `send` may be between the two steps).
EMPTY_SEND_GRACE = 600.0  # s


def abandon_empty_sends(spool: Any) -> None:
    """Campaigns a `send` made and then died before it began reading their
    list (a kill -9, a power loss between the two steps) are abandoned, each
    said on stderr: nothing of theirs was spooled, and none would ever end
    (before: "active" and empty for good in every campaign list, the API's and
    the dashboard's). A campaign with any row, or a list being (or once) read,
    is not one. Run by `send` and `resume` once they supervise the spool."""
    import time

    from fastsend.spool import ABANDONED

    made = [info for info in spool.list_campaigns()
            if info.status == "active" and isinstance((info.options or {}).get(RUN_OPTION), dict)]  # fmt: skip
    if not made:
        return
    read = {j.campaign for j in spool.list_ingests()}
    shared = spool.shared() is not None
    now = time.time()
    for info in made:
        if info.id in read or (shared and now - info.created < EMPTY_SEND_GRACE):
            continue
        if any(spool.counts(info.id).values()):
            continue
        spool.set_campaign_status(info.id, ABANDONED, "its send died before reading its list")
        print(
            f"fastsend: campaign {info.id} {info.name!r}: its `send` died before it began"
            " reading its list (nothing of it was spooled): abandoned",
            file=sys.stderr,
        )


def with_run(args: argparse.Namespace, run: dict[str, Any]) -> argparse.Namespace:
    """``args`` with a recorded run's options (:func:`recorded_run`) in place."""
    out = argparse.Namespace(**vars(args))
    for name in RUN_FLAGS:
        default: Any = [] if name in ("route", "nameserver") else None
        setattr(out, name, run.get(name, default))
    return out


def resume_command(args: argparse.Namespace) -> str:
    """The ``fastsend resume`` command line that continues this run: the same
    config, spool and engine options (a resume given none of the routing ones
    takes the campaign's recorded ones, :func:`recorded_run`; said in full all the
    same), paths made absolute, quoted for a POSIX shell."""
    import shlex

    from fastsend.spool import is_redis_url

    cmd = ["fastsend", "resume"]
    if args.config:
        cmd += ["-c", os.path.abspath(args.config)]
    if args.spool:  # a Redis password is never printed: the operator puts it back
        cmd += ["--spool", redact_url(args.spool) if is_redis_url(args.spool)
                else os.path.abspath(args.spool)]  # fmt: skip
    for r in args.route:
        cmd += ["--route", r]
    for flag, value in (("--source-ip", args.source_ip), ("--helo", args.helo),
                        ("--retry", args.retry)):  # fmt: skip
        if value:
            cmd += [flag, value]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    for ns in args.nameserver:
        cmd += ["--nameserver", ns]
    if args.max_wait != 300.0:
        cmd += ["--max-wait", f"{args.max_wait:g}"]
    if getattr(args, "fail_deferred", False):
        cmd.append("--fail-deferred")
    return shlex.join(cmd)


def stopped_by_signal(summary: dict[str, Any], args: argparse.Namespace, rows_left: int) -> int:
    """After a run a SIGTERM/SIGHUP/SIGINT ended (``summary["signal"]``): say what is
    left and the command that continues, and return the exit status a shell
    gives a process that signal ended (128 + its number: 143, 129, 130). 0 when no
    signal stopped the run."""
    import signal

    signum = int(summary.get("signal") or 0)
    if not signum:
        return 0
    queued = int(summary.get("deferred", 0))
    unread = f" and {rows_left:,} list row(s) not yet read" if rows_left else ""
    print(
        f"fastsend: stopped by {signal.Signals(signum).name}: {queued:,} message(s) still"
        f" queued{unread}; continue with: {resume_command(args)}",
        file=sys.stderr,
    )
    return 128 + signum


def still_deferred(summary: dict[str, Any], args: argparse.Namespace) -> int:
    """``--fail-deferred``: when mail is still deferred (queued for a retry) as the
    run returns, say so and return 75 (EX_TEMPFAIL: a job runner retries, and
    ``fastsend resume`` carries on); 0 otherwise, and always without the flag (the
    mail stays queued, no failure). A run a signal stopped is said by
    :func:`stopped_by_signal`."""
    queued = int(summary.get("deferred", 0))
    if not getattr(args, "fail_deferred", False) or not queued or summary.get("signal"):
        return 0
    print(
        f"fastsend: {queued:,} recipient(s) still deferred, none due within --max-wait;"
        f" they stay queued (--fail-deferred: exit {EX_TEMPFAIL}); continue with:"
        f" {resume_command(args)}",
        file=sys.stderr,
    )
    return EX_TEMPFAIL


def die(msg: str, code: int = 2) -> int:
    print(f"fastsend: error: {msg}", file=sys.stderr)
    return code


EX_TEMPFAIL = 75  # another live process holds what this one needs: try again later


def hold_supervisor(spool: Any, command: str, local_dir: str) -> int:
    """Make this process the spool's one supervisor (``Spool.hold_supervisor``)
    and, on a shared spool, its node's ``local_dir``'s one user
    (``Spool.hold_local_dir``): 0, or the error printed, the spool closed and
    :data:`EX_TEMPFAIL` when a live process supervises it (two would requeue
    each other's in-flight mail) or runs a node with that directory."""
    from fastsend.spool import SpoolBusy

    try:
        spool.hold_supervisor(command)
        spool.hold_local_dir(local_dir, command)
    except SpoolBusy as e:
        spool.close()
        return die(str(e), EX_TEMPFAIL)
    warn_volatile(spool)
    return 0


def warn_volatile(spool: Any) -> None:
    """On a shared spool whose Redis keeps what it is given in memory only
    (appendonly no), say so once at start: ``serve`` refuses it without
    ``--allow-volatile``, and ``send``/``resume`` spooled into it without a word
    (a Redis restart lost the list). The command goes on (a test bed's Redis)."""
    shared = spool.shared()
    if shared is None:
        return
    from fastsend.cluster import read_durability

    try:
        d = read_durability(shared.client)
    except spool.outage_errors():
        return  # (said by the first step that needs it)
    if d.level == "none":
        print(f"fastsend: warning: an acknowledged message survives {d.survives}: a Redis"
              " restart loses the spool; set appendonly yes (deploy/redis.conf)",
              file=sys.stderr)  # fmt: skip
    if d.evicts:
        from fastsend.cluster import evicts_text

        print(f"fastsend: warning: {evicts_text(d.evicts)}", file=sys.stderr)


def hold_source_ips(spool: Any, cfg: Any) -> Any:
    """On a shared spool, this node's source IPs held in the cluster's registry
    (``fastsend.cluster.ClusterNode``, as ``serve`` does) for ``engine.run``
    to renew and give back: the node, or the error printed and
    :data:`EX_TEMPFAIL` when another live node holds one (two nodes sending
    from one address would each keep its per-site rates and warm-up cap: twice
    the limit). None: a local spool, or no source IPs."""
    shared = spool.shared()
    if shared is None or not cfg.source_ips:
        return None
    from fastsend.cluster import ClusterError, ClusterNode, dead_here

    node = ClusterNode(shared.client, shared.prefix, shared.node, shared.lease)
    try:
        node.claim_ips(list(cfg.source_ips), dead_here(shared.client, shared.prefix, shared.node))
    except ClusterError as e:
        return die(str(e), EX_TEMPFAIL)
    except spool.outage_errors() as e:
        return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
    return node


def stopped_by_storage(e: BaseException, spool_url: str) -> int | None:
    """When ``e`` (a run's error) is the spool's storage refusing a write (a
    full disk, a read-only file system, an I/O error), say so plainly, with
    what is kept and the command that continues, and return
    :data:`EX_TEMPFAIL`; None for any other error (the caller re-raises it).
    Nothing accepted is lost: every row was committed before it counted, and
    what was in flight is queued again at the next start."""
    from fastsend.spool import storage_problem

    problem = storage_problem(e)
    if problem is None:
        return None
    url = redact_url(spool_url)
    return die(
        f"the spool at {url!r} {problem} ({e}): stopped. Nothing accepted is lost"
        " (mail in flight is queued again at the next start, and a list being read goes"
        " on from its last committed row); make room, then run `fastsend resume"
        f" --spool {url}` with this run's routes and options",
        EX_TEMPFAIL,
    )


def run_engine(
    run: Callable[[], dict[str, Any]], spool_url: str, events: Any, suppression: Any
) -> dict[str, Any] | int:
    """Run ``send``'s or ``resume``'s engine (``run``), then close its event log
    and suppression list (None: none of its own). When the spool's storage
    refused a write, the exit status (:func:`stopped_by_storage` says it
    plainly) with both closed as far as they can be; any other error
    propagates."""
    try:
        summary = run()
    except Exception as e:  # the spool's storage refused a write: said plainly
        code = stopped_by_storage(e, spool_url)
        if code is None:
            raise
        for f in (events, suppression):
            if f is not None:
                with contextlib.suppress(Exception):  # on the same full disk, maybe
                    f.close()
        return code
    events.close()
    if suppression is not None:
        suppression.close()
    return summary
