"""Shared fixtures: event-loop flavours, free ports, real servers on loopback.

Fixtures here start real programs (Postfix's smtp-sink, a dnslib DNS server);
nothing is mocked. Area-specific fixtures live in the area's test files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastsend.testing.dnsserver import DNSServer

IN_CI = bool(os.environ.get("CI") or os.environ.get("FASTSEND_CI"))

REPO_ROOT = Path(__file__).resolve().parent.parent

# How long a test's SMTP client waits for the intake's reply to a report's DATA
# (a ceiling): the intake answers once the report is parsed, and the parse child
# (spawned at the first report, niced) may take parsepool.START_SECONDS to start
# on a loaded host and WALL_SECONDS_MAX to parse. Under the lander's load a 10 s
# (and aiosmtplib's 60 s) wait gave up first.
REPORT_REPLY_TIMEOUT = 180.0
# Tool caches a run makes in the checkout (pytest's, hypothesis's, bytecode).
_TREE_SKIPPED = {".git", "__pycache__", ".benchmarks", ".pytest_cache", ".hypothesis",
                 ".mypy_cache", ".ruff_cache", ".import_linter_cache", "build"}  # fmt: skip
_TREES_BEFORE: dict[Path, dict[str, tuple[int, int]]] = {}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (mtime, size) and directory (0, 0) under ``root``, caches aside."""
    out: dict[str, tuple[int, int]] = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _TREE_SKIPPED and not x.endswith(".egg-info")]
        rel = os.path.relpath(d, root)
        if rel != ".":
            out[rel + os.sep] = (0, 0)
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(d, f))
                out[os.path.normpath(os.path.join(rel, f))] = (st.st_mtime_ns, st.st_size)
    return out


def _tracked(root: Path) -> set[str]:
    """The files git tracks under ``root`` (none outside a git checkout)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True,
                           timeout=30)  # fmt: skip
        if r.returncode == 0:
            return {os.path.normpath(p) for p in r.stdout.decode().split("\0") if p}
    return set()


def _watched() -> set[Path]:
    """The checkout, and ``./spool`` (a default Config's spool: its event log, lock,
    secret) when the current directory is elsewhere (not all of it: /tmp, say,
    changes under other programs)."""
    cwd = Path.cwd().resolve()
    return {REPO_ROOT} if cwd == REPO_ROOT else {REPO_ROOT, cwd / "spool"}


def _compile_fastsend() -> None:
    """Byte-compiles the fastsend package the tests import (its __pycache__, as
    Python would, once) even when bytecode writes are off (PYTHONDONTWRITEBYTECODE,
    a clean checkout's first run): else every ``fastsend`` process a test starts
    (serve, send, apikey: hundreds) compiles its ~180 modules from source, ~2 s
    of a serve's start and ~0.7 s of a CLI call. Up-to-date files are skipped."""
    import compileall

    import fastsend

    with contextlib.suppress(OSError):
        compileall.compile_dir(str(Path(fastsend.__file__).parent), quiet=2, workers=0)


def _rewrite_one(path: str) -> None:
    """Writes the assert-rewritten pyc of one test module (pytest's own cache
    file: what its import hook reads before rewriting), unless it is up to date."""
    from _pytest.assertion import rewrite

    fn = Path(path)
    pyc = rewrite.get_cache_dir(fn) / (fn.name[:-3] + rewrite.PYC_TAIL)
    if rewrite._read_pyc(fn, pyc) is not None:
        return
    with contextlib.suppress(OSError, SyntaxError, ValueError):  # (collection reports it)
        rewrite.try_makedirs(pyc.parent)
        stat, co = rewrite._rewrite_test(fn, _REWRITE_CONFIG[0])
        rewrite._write_pyc(_REWRITE_CONFIG[0].stash[rewrite.assertstate_key], co, stat, pyc)


_REWRITE_CONFIG: list[pytest.Config] = []


def _precompile_tests(config: pytest.Config) -> None:
    """Rewrites the asserts of the test modules this run collects once, in the
    xdist controller before its processes start, into pytest's pyc cache (and
    byte-compiles tests/_*.py): pytest writes that cache only when bytecode writes
    are on (PYTHONDONTWRITEBYTECODE is set on some hosts, and a clean checkout has
    none), so each of the -n processes rewrote and compiled ~230 modules itself:
    ~25 s of CPU each (on 2 cores, -n 4 spent ~50 s of the run's start on it).
    Two forked processes share the work; an up-to-date pyc is kept."""
    import compileall
    import multiprocessing

    if config.getoption("assertmode", "rewrite") != "rewrite":
        return
    tests = REPO_ROOT / "tests"
    files: set[Path] = set()
    for arg in config.args:
        p = Path(arg.split("::")[0]).resolve()
        if p.is_dir() and (p == tests or tests in p.parents or p in tests.parents):
            files.update(tests.glob("test_*.py"))
        elif p.suffix == ".py" and p.parent == tests and p.name.startswith("test_"):
            files.add(p)
    if not files:
        return
    files.add(tests / "conftest.py")
    with contextlib.suppress(OSError):
        compileall.compile_dir(str(tests), maxlevels=0, quiet=2, workers=0)
    _REWRITE_CONFIG[:] = [config]
    todo = sorted(str(f) for f in files)
    with multiprocessing.get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
        pool.map(_rewrite_one, todo, chunksize=4)


@pytest.hookimpl(tryfirst=True)  # (before pytest-xdist's, which starts the processes)
def pytest_sessionstart(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # pytest-xdist worker: the controller watches
    for root in _watched():
        _TREES_BEFORE[root] = _tree(root)
    _compile_fastsend()
    if getattr(session.config.option, "numprocesses", None):
        _precompile_tests(session.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that writes into the checkout or the current directory (a spool, a
    secret key, an event log, a supervisor lock: a default Config's ``./spool``)
    fails the run, new or changed files alike, in ignored paths too (``./spool/``
    is ignored by git, so nothing is committed by mistake, but a test writing
    there shares state with every other such test and with a developer's own
    spool). Such files were committed once by mistake (a Redis URL taken for a
    local directory made ./redis:/...). Tests use ``tmp_path``."""
    if hasattr(session.config, "workerinput"):
        return  # pytest-xdist worker: the controller checks once
    for root, before in _TREES_BEFORE.items():
        after = _tree(root)
        tracked = _tracked(root)  # (edited by hand during the run, perhaps: git shows them)
        new = sorted(p for p in after if p not in before)
        changed = sorted(p for p in after
                         if p in before and after[p] != before[p] and p not in tracked)  # fmt: skip
        if new or changed:
            print(f"\nFAILED: the tests left files in {root}: new {new[:20]}, changed {changed[:20]}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--maxschedchunk 1`` (scripts/test: pytest-xdist hands out the tests one
    or two at a time) the slowest tests (tests/slowest.txt) go first, slowest first,
    the rest in their usual order."""
    if config.getoption("maxschedchunk", None) != 1:
        return
    lines = (REPO_ROOT / "tests" / "slowest.txt").read_text().splitlines()
    ids = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    rank = {n: i for i, n in enumerate(ids)}
    items.sort(key=lambda it: rank.get(it.nodeid, len(rank)))  # (stable: the rest as they were)


def bounce_corpus() -> Path | None:
    """The labelled bounce corpus (read-only, beside the repo): ../shared/corpora/bounces,
    or FASTSEND_BOUNCE_CORPUS. None when this checkout has no shared/ beside it
    (it is data, not something CI can install, so tests skip then)."""
    candidates = [
        os.environ.get("FASTSEND_BOUNCE_CORPUS", ""),
        str(Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "bounces"),
        "/work/shared/corpora/bounces",
    ]
    for c in candidates:
        if c and (Path(c) / "labels.json").exists():
            return Path(c)
    return None


def _port_span() -> tuple[int, int]:
    """Where ``free_port`` hands out ports: below the kernel's ephemeral range
    (net.ipv4.ip_local_port_range), one slice per pytest-xdist worker."""
    lo, hi = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    start, end = (10000, lo) if lo - 10000 >= 4000 else (hi + 1, 65536)
    if end - start < 4000:
        return 0, 0  # no room outside the ephemeral range: the kernel's choice
    workers = 8
    size = (end - start) // workers
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    k = int(worker) % workers if worker.isdigit() else 0
    return start + k * size, start + (k + 1) * size


# The ports this process handed out (sys.modules holds them: tests import this
# module both as ``conftest`` and ``tests.conftest``, two module objects).
_GIVEN: dict[int, None] = sys.modules.setdefault("_fastsend_test_ports", {})  # type: ignore[arg-type]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server a test starts next.

    Not the kernel's ``bind(0)`` choice: that port comes from the ephemeral
    range, the pool every other ``bind(addr, 0)`` draws from (another xdist
    worker's free_port, an outgoing connection bound to its source IP as
    fastsend's are), so between this call and the server's bind it may be
    taken: the server fails with EADDRINUSE, or ``wait_port`` finds another
    test's server there. The kernel never hands out ports below that range;
    each xdist worker has its own slice, so no two workers of one run get the
    same port, and a port at random in it (not the next one: two test runs on
    one machine walking a slice in step gave a serve's API port to another's
    SMTP listener), never one this process gave in its last 1,000."""
    lo, hi = _port_span()
    if not lo:
        with socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    for _ in range(4 * (hi - lo)):
        port = lo + int.from_bytes(os.urandom(4), "big") % (hi - lo)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use (a listener, a socket in TIME_WAIT): another
        _GIVEN[port] = None
        if len(_GIVEN) > 1000:
            del _GIVEN[next(iter(_GIVEN))]
        return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def wait_greeting(
    host: str, port: int, expect: bytes, proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 60.0,
) -> None:  # fmt: skip
    """Wait until the SMTP server a test started greets on ``port`` with a 220
    line holding ``expect`` (its host name). ``wait_port`` alone cannot tell a
    server that failed to bind (it exits: ``proc`` is checked) from another
    test run's listener on the same port, which may never greet (an HTTP API):
    the test then timed out at its first SMTP command with nothing to say why."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for port {port} exited ({proc.returncode})")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(max(1.0, deadline - time.monotonic()))
                seen = s.recv(512)
                if seen.startswith(b"220") and expect in seen:
                    return
                raise RuntimeError(f"port {port} is not our server's: it answered {seen[:120]!r}")
        except (ConnectionError, TimeoutError) as exc:
            seen = repr(exc).encode()
            time.sleep(0.05)
    raise TimeoutError(f"no greeting holding {expect!r} on {host}:{port} (last: {seen[:120]!r})")


class ServeProcess:
    """A real ``fastsend serve [ARGS] -c CFG`` process, run from the config's folder
    (output to ``serve.log`` there), returned once its API port ``port`` listens
    and it said "ready in" (or exited): it listens on the API before its SMTP
    listeners, webhooks and supervisor are up, and a test that went on at the
    port met them not yet there on a loaded machine (``ready=False``: the port
    only). The one way tests start a server (tests/_serve_helpers.Served builds
    on it)."""

    def __init__(
        self, cfg: Path, port: int, *args: str, env: dict[str, str] | None = None,
        umask: int = -1, ready: bool = True,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = cfg.parent / "serve.log"
        self.base = f"http://127.0.0.1:{port}"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastsend", "serve", *args, "-c", str(cfg)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=cfg.parent, umask=umask,
            )  # fmt: skip
        try:
            wait_port("127.0.0.1", port, timeout=60)
            if ready:  # (an exit is the caller's to judge: some tests expect one)
                deadline = time.monotonic() + 120
                while not any("ready in" in ln for ln in self.lines):
                    if self.proc.poll() is not None:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    time.sleep(0.02)
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"serve did not start: {self.log.read_text(errors='replace')}") from None

    @property
    def lines(self) -> list[str]:
        """What it printed so far, line by line."""
        return self.log.read_text(errors="replace").splitlines(keepends=True)

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in server output: {''.join(self.lines)}")
            time.sleep(0.02)

    def api_key(self, tenant: str) -> str:
        """A new key for ``tenant`` (``fastsend apikey create``, the way an operator makes one)."""
        return create_api_key(self.cfg, tenant, self.env)

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed, -9, if still running after 30 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def create_api_key(cfg: Path, tenant: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", tenant, "-c", str(cfg)],
        check=True, capture_output=True, text=True, env=env, cwd=cfg.parent,
    ).stdout.strip()  # fmt: skip


def require_program(name: str) -> str:
    """Path of an external program; in CI its absence is a failure, not a skip."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion on the parametrised loop flavour."""

    def _run(coro: Coroutine[Any, Any, Any]) -> Any:
        if loop_kind == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                return r.run(coro)
        with asyncio.Runner() as r:
            return r.run(coro)

    return _run


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> str:
    """'py' or 'c': tests of accelerated code run over both implementations."""
    if request.param == "c":
        from fastsend import _accel

        if not _accel.HAVE_EXTENSIONS:
            if IN_CI:
                pytest.fail("fastsend._core must be built in CI")
            pytest.skip("fastsend._core not built")
    return str(request.param)


class PostfixSink:
    """Postfix's smtp-sink on loopback (a real, fast C SMTP server)."""

    def __init__(self, host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.host, self.port, self.proc = host, port, proc


@pytest.fixture
def postfix_sink() -> Iterator[PostfixSink]:
    exe = require_program("smtp-sink")
    port = free_port()
    # -c: count, -4: IPv4, -u: run as (we may be root), backlog 256
    proc = subprocess.Popen(
        [exe, "-4", "-u", "nobody", "-c", f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield PostfixSink("127.0.0.1", port, proc)
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port (tests/_redis_helpers.py);
    each ``url()`` gets a fresh key prefix, so tests share the server safely."""
    from tests._redis_helpers import start_redis  # it imports this module

    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(cert.pem, key.pem, client SSLContext trusting them) for localhost/127.0.0.1,
    from a throwaway CA (tests/_serve_helpers.make_certs)."""
    from tests._serve_helpers import make_certs  # it imports this module

    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["sqlite", "redis"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A spool for a ``fastsend`` command's ``--spool``: a directory, then a
    Redis spool URL with a stable node name (a restarted process takes its own
    in-flight window back at once). A file may define its own."""
    if request.param == "sqlite":
        return str(tmp_path / "spool")
    server = request.getfixturevalue("redis_server")
    return str(server.url(node="n1", dir=str(tmp_path / "spool")))


@pytest.fixture(params=["sqlite", "redis"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    """Opens the same spool again on each call: SQLite, then Redis (one node)."""
    from fastsend.spool import open_spool
    from fastsend.spool.sqlite import SQLiteSpool

    if request.param == "sqlite":
        return lambda: SQLiteSpool(str(tmp_path))
    url = request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path))
    return lambda: open_spool(url)


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """An empty DNS server on 127.0.0.1; tests call ``set_zones``."""
    with DNSServer({}) as server:
        yield server


# ---------------------------------------------------------------- Exim
EXIM_CONF = """\
primary_hostname = exim.test
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
chunking_advertise_hosts = *
pipelining_advertise_hosts = *
tls_advertise_hosts =
host_lookup =
rfc1413_hosts =
queue_only = true
keep_environment =
log_selector = +received_recipients +smtp_protocol_error +smtp_syntax_error
acl_smtp_rcpt = acl_rcpt
begin acl
acl_rcpt:
  deny local_parts = ^permfail-.*
       message = 5.1.1 User unknown
  defer local_parts = ^tempfail-.*
       message = 4.3.0 Try again later
  deny local_parts = ^policy-.*
       message = 5.7.1 Rejected by policy
  accept
begin routers
blackhole:
  driver = redirect
  data = :blackhole:
"""


def exim_root() -> Path | None:
    """Where scripts/fetch-exim unpacked Exim (None when it did not)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for c in (os.environ.get("FASTSEND_EXIM_ROOT", ""), os.path.join(cache, "fastsend", "exim")):
        if c and (Path(c) / "usr" / "sbin" / "exim4").exists():
            return Path(c)
    return None


class EximServer:
    """Exim 4 on loopback with a private config: offers PIPELINING and CHUNKING,
    enforces command synchronisation, keeps what it accepts in its queue (no
    delivery) and refuses at RCPT by local part: ``permfail-*`` 550 5.1.1,
    ``tempfail-*`` 451 4.3.0, ``policy-*`` 550 5.7.1."""

    def __init__(self, host: str, port: int, directory: Path, proc: subprocess.Popen[bytes]):
        self.host, self.port, self.dir, self.proc = host, port, directory, proc

    def mainlog(self) -> str:
        p = self.dir / "log" / "mainlog"
        return p.read_text(errors="replace") if p.exists() else ""

    def received(self) -> list[tuple[str, list[str]]]:
        """(sender, recipients) of every message Exim accepted, from its main log."""
        out = []
        for line in self.mainlog().splitlines():
            parts = line.split()
            if len(parts) > 4 and parts[3] == "<=":
                rcpts = line.rpartition(" for ")[2].split() if " for " in line else []
                out.append((parts[4], rcpts))
        return out

    def protocol_errors(self) -> list[str]:
        return [
            ln
            for ln in self.mainlog().splitlines()
            if "protocol error" in ln or "synchronization error" in ln
        ]


@pytest.fixture
def exim_server() -> Iterator[EximServer]:
    with start_exim() as server:
        yield server


@contextlib.contextmanager
def start_exim(extra_conf: str = "") -> Iterator[EximServer]:
    """Exim on a free loopback port with EXIM_CONF; ``extra_conf`` (main
    section options, e.g. ``smtp_accept_max_per_connection = 10``) goes first."""
    # (it imports this module)
    from tests._mta_helpers import exim_daemon, exim_env, exim_or_skip, exim_workdir

    root = exim_or_skip()
    with exim_workdir("fastsend-exim-") as d:
        port = free_port()
        conf = d / "exim.conf"
        conf.write_text(extra_conf + EXIM_CONF.format(dir=d, port=port))
        argv = [str(root / "usr/sbin/exim4"), "-C", str(conf), "-bdf", "-oX", str(port)]
        with exim_daemon(argv, port, exim_env(root)) as proc:
            yield EximServer("127.0.0.1", port, d, proc)
