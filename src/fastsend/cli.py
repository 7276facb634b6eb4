"""The ``fastsend`` command line: one table of subcommands, each in its own module.

Each entry names a module that defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so
``fastsend --help`` stays fast and one broken area cannot break the others.

This module does no work of its own: it parses and dispatches.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from fastsend import __version__

# name -> (module, one-line help). Keep sorted by the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fastsend.commands.demo", "send a 100,000-recipient demo campaign to a local sink"),
    "send": (
        "fastsend.commands.send",
        "spool a campaign and deliver it (campaign file + recipients)",
    ),
    "resume": (
        "fastsend.commands.resume",
        "deliver what a spool still holds after a crash or stop",
    ),
    "queue": (
        "fastsend.commands.queue",
        "show the queue's shape per domain and age, and per state",
    ),
    "campaign": ("fastsend.commands.campaign", "list campaigns; pause, resume or cancel one"),
    "top": (
        "fastsend.commands.top",
        "a live full-screen view of rates per provider, source IP and campaign",
    ),
    "sink": (
        "fastsend.commands.sink",
        "run a fast fault-injecting SMTP sink for tests and load tests",
    ),
    "dkim": (
        "fastsend.commands.dkim",
        "DKIM key tools: keygen (writes a key, prints the DNS TXT record)",
    ),
    "check-config": (
        "fastsend.commands.check_config",
        "check a config file: every section, unknown keys, types, settings that cannot apply",
    ),
    "check-domain": (
        "fastsend.commands.check_domain",
        "check a sending domain's MX, SPF, DKIM, DMARC and PTR records",
    ),
    "tls-report": (
        "fastsend.commands.tls_report",
        "TLS-RPT (RFC 8460): show or send the daily TLS reports to the recipient domains",
    ),
    "check-ip": (
        "fastsend.commands.check_ip",
        "check source IPs against DNS blocklists ([reputation] blocklists)",
    ),
    "bounce": (
        "fastsend.commands.bounce",
        "classify bounce and complaint messages (DSN, ARF, vendor formats)",
    ),
    "suppress": (
        "fastsend.commands.suppress",
        "manage the suppression list: add, remove, list, import, export",
    ),
    "serve": (
        "fastsend.serve.main",
        "run the long-lived MTA: HTTP API, SMTP listeners, tracking, webhooks, metrics",
    ),
    "apikey": ("fastsend.commands.apikey", "create, list and revoke API keys (stored hashed)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsend",
        description="fastsend: a fast outbound MTA for bulk and transactional mail.",
    )
    parser.add_argument("--version", action="version", version=f"fastsend {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None, *, entry: bool = False) -> int:
    """Run one command. ``entry``: this is the process's own run (not a caller's
    in-process one): the command's modules are imported with the cycle
    collector off and then frozen out of its sight (``gc.freeze``). They live
    as long as the process; each collection during the import would scan all
    of them again (~7% of the import time: 5-8 ms for ``send``), and each
    collection after it too.

    A command module whose options need less than its run names what the run
    needs in ``RUN_IMPORTS`` (``send``, ``resume``: the engine): imported the
    same way once the options parsed, so ``fastsend send --help`` imports
    only the options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # First pass: find the subcommand without its options, then let its module
    # add them (lazy import keeps `fastsend --help` fast). The table of every
    # subcommand is built only for help, --version or a wrong name.
    if not argv:
        # No command is a usage error, as argparse makes any other one: the usage
        # and the commands on stderr, exit 2 (a script that forgot its command
        # must not pass as done).
        parser = build_parser()
        parser.print_help(sys.stderr)
        parser.exit(2, "fastsend: error: a command is required\n")
    if argv[0] not in COMMANDS:
        build_parser().parse_args(argv)
        return 2
    name = argv[0]
    module = _import(COMMANDS[name][0], entry)
    sub = argparse.ArgumentParser(prog=f"fastsend {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    for needed in getattr(module, "RUN_IMPORTS", ()):
        _import(needed, entry)
    # Spools hold every tenant's mail, keys and secrets: whatever the caller's umask,
    # what fastsend creates is for its own user only (directories 0700, files 0600).
    os.umask(os.umask(0o077) | 0o077)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fastsend queue --json | head`: the reader of our output left. Said by no
        # traceback, as a Unix tool killed by SIGPIPE says nothing; a pipe broken
        # elsewhere (a socket) is an error as before.
        if not _stdout_gone():
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)  # the exit's own flush: nowhere
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # as the shell shows a process SIGPIPE ended
    except Exception as e:  # a damaged database: one line that says what to do
        # (after BrokenPipeError: an Exception handler first took the closed pipe
        # of `fastsend dkim keygen | head` and re-raised it as a traceback)
        import errno

        from fastsend.procs import leave_hung_up_terminal
        from fastsend.spool.base import TEMPORARY_STORAGE, storage_problem
        from fastsend.sqlitedb import corrupt_database

        # A write to a terminal that was hung up (EIO): no disk's fault; ended by
        # the hangup, as the shell says of a process SIGHUP ended.
        if isinstance(e, OSError) and e.errno == errno.EIO and leave_hung_up_terminal():
            return 128 + 1

        why = corrupt_database(e)
        if why is not None:
            print(f"fastsend {name}: {why}", file=sys.stderr)
            return 1
        # A file it writes on a full disk or read-only file system (the API key
        # store of `apikey create`, a suppression list, a DKIM key): one line, not a
        # traceback; a full disk is "try again later" (75), else the operator's (2).
        problem = storage_problem(e)
        if problem is None or "permission" in problem:  # (EACCES: maybe a read; as before)
            raise
        print(f"fastsend {name}: the disk {problem}: {e}", file=sys.stderr)
        return 75 if problem in TEMPORARY_STORAGE else 2


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket no one reads any more (poll: POLLERR on a
    pipe whose read end is closed, POLLHUP on a socket shut down)."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):  # closed, or no file descriptor
        return True


def _import(name: str, entry: bool) -> Any:
    """Module ``name``, imported; in the process's own run with the cycle
    collector off, and what it imported frozen (see :func:`main`). Through
    ``__import__``, not ``importlib.import_module``: ``-X importtime`` times
    only what ``__import__`` imports."""
    if not (entry and gc.isenabled()):
        __import__(name)
        return sys.modules[name]
    gc.disable()
    try:
        __import__(name)
        return sys.modules[name]
    finally:
        gc.freeze()
        gc.enable()


def run_process() -> NoReturn:
    """The process entry (``python -m fastsend``, the ``fastsend`` script): :func:`main`,
    then exit. A command whose module sets ``EXIT_AT_ONCE`` (it has closed all it
    opened, no thread of its own is left: ``send``, ``resume``) exits without the
    interpreter's teardown of every module and object (~25 ms of CPU and wall
    per command), once stdout and stderr are flushed. A command started by
    another fastsend process that asked for it (``procs.PARENT_ENV``: ``fastsend
    demo``'s sink) dies with that process."""
    if "FASTSEND_DIE_WITH_PARENT" in os.environ:  # procs.PARENT_ENV (import it only then)
        from fastsend.procs import die_with_parent_from_env

        die_with_parent_from_env()
    code = main(entry=True)
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    module = sys.modules.get(COMMANDS[name][0]) if name in COMMANDS else None
    # Not under a profiler or tracer (cProfile, coverage): they write at exit.
    traced = sys.getprofile() is not None or sys.gettrace() is not None
    if getattr(module, "EXIT_AT_ONCE", False) and not traced:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            code = code or 1
        os._exit(code)
    raise SystemExit(code)
