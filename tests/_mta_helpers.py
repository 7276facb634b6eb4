"""Private real MTAs for tests: a Postfix run by a master of its own (its own
config, queue and log under a temporary directory) and an unpacked Exim daemon,
each on loopback ports of the test's. One way to make, start and stop them, so
each test file says only what is its own: its main.cf lines, its listeners,
its Exim configuration. Both need root (a private Postfix master, Exim's own
user); CI runs as root and installs both, so there they never skip."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from tests.conftest import IN_CI, exim_root, wait_greeting, wait_port

POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"

# What every private Postfix shares: its directories, its name, loopback only,
# relaying for loopback clients to any domain, no local delivery, the log on
# the master's stdout (the test's maillog file).
POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = {hostname}
myorigin = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = static:ALL
alias_maps =
alias_database =
maillog_file = /dev/stdout
maillog_file_prefixes = /dev/stdout
"""

# master.cf's internal services (after a test's own smtpd listeners).
POSTFIX_SERVICES = """\
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
pickup unix n - n 60 1 pickup
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
flush unix n - n 1000? 0 flush
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
tlsmgr unix - - n 1000? 1 tlsmgr
postlog unix-dgram n - n - 1 postlogd
"""


def needs_root_mta(what: str, present: bool, install: str = "") -> None:
    """Skip (fail in CI, which installs it) when the MTA is missing; skip when
    not root. ``install``: how CI gets it, for the failure's message."""
    if not present:
        if IN_CI:
            pytest.fail(f"{what} is required in CI{f' ({install})' if install else ''}")
        pytest.skip(f"{what} not installed")
    if os.geteuid() != 0:
        pytest.skip(f"a private {what} needs root")


def _stop(proc: subprocess.Popen[bytes], wait: float) -> None:
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def private_postfix(
    main_cf: str,
    listeners: str,
    ports: Iterable[int],
    *,
    hostname: str = "postfix.test",
    prefix: str = "fastsend-postfix-",
    prepare: Callable[[Path], None] | None = None,
    **fields: object,
) -> Iterator[Path]:
    """A Postfix master of its own; yields its directory (``maillog`` in it).

    ``main_cf``: the test's own main.cf lines after :data:`POSTFIX_MAIN_CF`,
    formatted with ``d`` (the directory) and ``fields``; ``listeners``: its
    smtpd lines of master.cf (formatted), before :data:`POSTFIX_SERVICES`;
    ``ports``: those its listeners take, waited for; ``prepare``: writes what
    the config names (certificates) into the directory before the start."""
    needs_root_mta(
        "Postfix",
        os.path.exists(POSTFIX_MASTER) and shutil.which("postfix") is not None,
        ".ci/run installs it",
    )
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        d.chmod(0o755)  # whatever the umask: Postfix's own users must traverse it
        for sub in ("etc", "queue", "data"):
            (d / sub).mkdir()
            (d / sub).chmod(0o755)
        shutil.chown(d / "data", "postfix")
        if prepare is not None:
            prepare(d)
        (d / "etc" / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(d=d, hostname=hostname) + main_cf.format(d=d, **fields)
        )
        (d / "etc" / "master.cf").write_text(listeners + POSTFIX_SERVICES)
        env = {**os.environ, "MAIL_CONFIG": str(d / "etc")}
        # Postfix creates its queue and sockets with the caller's umask: the usual one.
        check = subprocess.run(
            ["postfix", "check"], env=env, capture_output=True, text=True, umask=0o022
        )
        if check.returncode:
            raise RuntimeError(f"postfix check failed: {check.stdout}{check.stderr}")
        with open(d / "maillog", "wb") as log:
            proc = subprocess.Popen(
                [POSTFIX_MASTER, "-d"], env=env, stdout=log, stderr=log, umask=0o022
            )
        try:
            for port in ports:
                wait_port("127.0.0.1", port)
            yield d
        finally:
            _stop(proc, 10)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def read_log(path: Path) -> str:
    """A log file's text so far ("" before its first line)."""
    return path.read_text(errors="replace") if path.exists() else ""


def exim_or_skip() -> Path:
    """Where scripts/fetch-exim unpacked Exim; skip (fail in CI) without it."""
    root = exim_root()
    if root is None:
        if IN_CI:
            pytest.fail("Exim is required in CI (scripts/test runs scripts/fetch-exim)")
        pytest.skip("Exim not unpacked (run scripts/fetch-exim)")
    return root


def exim_env(root: Path) -> dict[str, str]:
    """The environment the unpacked Exim runs in: its own libraries first."""
    env = dict(os.environ)
    libs = [str(root / "usr/lib/x86_64-linux-gnu"), str(root / "lib/x86_64-linux-gnu")]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


@contextlib.contextmanager
def exim_workdir(prefix: str) -> Iterator[Path]:
    """A directory with ``spool`` and ``log`` for Exim, removed at the end. Exim
    writes them as its own user, which cannot enter pytest's private tmp_path:
    one under the system's temp dir, open to it."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        for sub in ("spool", "log"):
            (d / sub).mkdir()
        for p in (d, d / "spool", d / "log"):
            p.chmod(0o777)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def exim_daemon(
    argv: list[str], port: int, env: dict[str, str] | None = None, *, greeting: bytes = b""
) -> Iterator[subprocess.Popen[bytes]]:
    """The Exim daemon ``argv`` (``-bdf``: in the foreground), once ``port``
    answers (``greeting``: with a 220 holding it, its ``primary_hostname``: not
    another run's listener there, ``conftest.wait_greeting``); what it said on
    stderr when it never does."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            if greeting:
                wait_greeting("127.0.0.1", port, greeting, proc)
            else:
                wait_port("127.0.0.1", port)
        except (TimeoutError, RuntimeError) as exc:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            raise RuntimeError(f"exim did not start ({exc}): {err[-2000:]}") from None
        yield proc
    finally:
        _stop(proc, 5)
