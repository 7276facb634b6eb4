"""What a whole `fastsend send` does around delivery: what it imports, what the
supervisor prepares once before forking the workers (dnspython when a name may
be looked up, DKIM keys, checked when the campaign is accepted), how a list
shorter than the workers' windows is shared between the workers, and that a
list of exactly one ingest chunk ends its ingest job."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tests._engine_helpers import (
    run_fastsend,
    send_via,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)

from fastsend import config as cfgmod
from fastsend.accept import CHUNK
from fastsend.address import ascii_and_non_ascii
from fastsend.delivery.mx import may_resolve
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool

# Modules the send path must not load: heavy, and only for other commands or
# for what this run does not use (MX lookups, DKIM, bounce parsing, serve).
NOT_ON_THE_SEND_PATH = (
    "dns",
    "cryptography",
    "nacl",
    "psutil",
    "email.feedparser",
    "fastsend.bounce.parse",
    "aiohttp",
    "fastsend.serve",
)


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def test_send_and_worker_modules_do_not_import_what_a_plain_send_does_not_use() -> None:
    mods = set(
        _loaded_after(
            "import fastsend.commands.send, fastsend.engine, fastsend.delivery.worker,"
            " fastsend.queue.supervisor"
        )
    )
    assert not [m for m in NOT_ON_THE_SEND_PATH if m in mods]


def test_prepare_imports_dnspython_before_fork_only_when_a_name_may_be_looked_up(
    tmp_path: Path,
) -> None:
    code = (
        "from fastsend import config\n"
        "from fastsend.delivery.worker import prepare\n"
        f"prepare(config.from_dict({{'routes': ROUTES}}, base_dir={str(tmp_path)!r}))\n"
    )
    ip_only = _loaded_after("ROUTES = {'*': '127.0.0.1:2525'}\n" + code)
    assert "dns.asyncresolver" not in ip_only
    by_name = _loaded_after("ROUTES = {'*': 'mx.example.net:25'}\n" + code)
    assert "dns.asyncresolver" in by_name


def test_set_pdeathsig_sets_the_signal_a_worker_gets_when_its_parent_dies(impl: str) -> None:
    """Both twins: prctl(PR_SET_PDEATHSIG) as read back with PR_GET_PDEATHSIG,
    in a forked child (the setting is the calling process's own)."""
    import ctypes
    import os
    import signal

    from fastsend import procs
    from fastsend._accel import compiled

    fn = compiled("set_pdeathsig") if impl == "c" else procs._py_set_pdeathsig
    libc = ctypes.CDLL(None)
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        got = ctypes.c_int(0)
        ok = fn(signal.SIGTERM) and libc.prctl(2, ctypes.byref(got), 0, 0, 0) == 0
        os._exit(0 if ok and got.value == signal.SIGTERM else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_prepare_with_the_compiled_core_imports_no_ctypes(tmp_path: Path) -> None:
    from fastsend import _accel

    if not _accel.HAVE_EXTENSIONS or _accel.NO_EXTENSIONS:
        pytest.skip("the pure twin looks prctl up through ctypes")
    mods = _loaded_after(
        "from fastsend import config\n"
        "from fastsend.delivery.worker import prepare\n"
        "prepare(config.from_dict({'routes': {'*': '127.0.0.1:2525'}},"
        f" base_dir={str(tmp_path)!r}))\n"
    )
    assert "ctypes" not in mods and "uvloop" in mods


@pytest.mark.parametrize("command", ["send", "resume"])
def test_help_of_an_engine_command_imports_no_engine(command: str) -> None:
    """`fastsend send --help` (and resume's) needs only the options: the command
    module imports the engine, the spool and the config when it runs."""
    probe = (
        "import contextlib, io\n"
        "from fastsend import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        f"    cli.main([{command!r}, '--help'])\n"
        "assert '--spool' in out.getvalue()\n"
    )
    mods = set(_loaded_after(probe))
    heavy = ("asyncio", "msgspec", "sqlite3", "fastsend.engine", "fastsend.config", "fastsend.spool")
    assert not [m for m in heavy if m in mods]


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({}, True),  # MX lookups
        ({"*": "127.0.0.1:25"}, False),
        ({"*": "[::1]:25"}, False),
        ({"*": "127.0.0.1:25", "a.example": "relay.example.net:25"}, True),
        ({"*": "relay.example.net:25"}, True),
        ({"a.example": "127.0.0.1:25"}, True),  # other domains still go by MX
    ],
)
def test_may_resolve(tmp_path: Path, routes: dict[str, str], expected: bool) -> None:
    cfg = cfgmod.from_dict({"routes": routes}, base_dir=str(tmp_path))
    assert may_resolve(cfg) is expected


def test_ascii_and_non_ascii_class_is_exactly_those_characters() -> None:
    import re

    allowed = "az09-.!"
    rx = re.compile(ascii_and_non_ascii(allowed))
    got = [i for i in range(0x110000) if rx.fullmatch(chr(i))]
    assert got == sorted(ord(c) for c in allowed) + list(range(0x80, 0x110000))


def test_a_short_list_is_shared_by_the_workers_and_its_job_ends(tmp_path: Path) -> None:
    """A list of one ingest chunk is less than one worker's window: both workers
    (each with its own source IP) deliver a share of it, the job ends (exit 0,
    nothing left for `resume`), and the summary gives each worker's CPU."""
    n = CHUNK
    addrs = [f"user{i}@d{i % 5}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        proc = send_via(
            camp, rcpts, sink.addresses[0], tmp_path / "spool",
            "--source-ip", "127.0.0.2,127.0.0.3", "--workers", "2", "--no-dkim",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume" not in proc.stderr
    s = summary(proc)
    assert s["delivered"] == n and s["ingest"]["left"] == 0
    assert len(s["worker_cpu_s"]) == 2
    per_ip: Counter[str] = Counter()
    for rec in sink_log(log):
        per_ip[rec["peer"]] += len(rec["recipients"])
    assert sum(per_ip.values()) == n
    assert set(per_ip) == {"127.0.0.2", "127.0.0.3"}
    assert min(per_ip.values()) >= n * 0.3, per_ip
    spool = open_spool(str(tmp_path / "spool"))
    job = spool.get_ingest(s["ingest"]["job"])
    spool.close()
    assert job is not None and job.finished


def test_a_bad_dkim_key_is_refused_before_anything_is_spooled(tmp_path: Path) -> None:
    key = tmp_path / "bad.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    camp = write_campaign(
        tmp_path,
        'from = "News <news@sender.example.com>"\nsubject = "Hi"\ntext = "Hello"\n'
        '[dkim]\ndomain = "sender.example.com"\nselector = "s1"\nkey = "bad.pem"\n',
    )
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    proc = run_fastsend(
        "send", str(camp), "-r", str(rcpts), "--route", "*=127.0.0.1:9",
        "--spool", str(tmp_path / "spool"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bad.pem" in proc.stderr and "PEM" in proc.stderr
    db = tmp_path / "spool" / "spool.db"
    if db.exists():
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_send_exits_at_once_with_its_output_and_status_intact(tmp_path: Path) -> None:
    """`python -m fastsend send` ends without the interpreter's teardown
    (cli.run_process): what it wrote to stdout and stderr arrives whole, and
    the exit status is the command's (1: a bad row was skipped)."""
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net", "not an address", "b@example.net"])
    with SinkProcess() as sink:
        proc = send_via(camp, rcpts, sink.addresses[0], tmp_path / "spool", "--no-dkim")
    assert proc.returncode == 1
    assert summary(proc)["delivered"] == 2
    assert proc.stdout.endswith("}\n")
    assert "1 bad recipient row(s) were skipped" in proc.stderr


def test_a_whole_send_imports_none_of_what_it_does_not_use(tmp_path: Path) -> None:
    """A real `fastsend send` (supervisor and workers, run with -X importtime):
    none of NOT_ON_THE_SEND_PATH is imported at any point of the run (the
    supervisor lock's process start time comes from /proc, not psutil), nor
    what only other mail needs (email.utils: self-contained messages and HTTP
    transports; html: tracked links; mimetypes: attachments)."""
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net", "b@example.org"])
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        cmd = [sys.executable, "-X", "importtime", "-m", "fastsend", "send", str(camp),
               "-r", str(rcpts), "--route", f"*={host}:{port}", "--workers", "2",
               "--spool", str(tmp_path / "spool"), "--json", "--no-progress", "--no-dkim"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 2
    imported = {
        line.rpartition("|")[2].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "fastsend.delivery.worker" in imported  # the probe works
    unused = (*NOT_ON_THE_SEND_PATH, "email.utils", "html.entities", "mimetypes")
    assert not [m for m in unused if m in imported]


def test_shipped_files_are_read_without_importlib_resources() -> None:
    """The shipped shaping defaults, bounce rules and machine-open rules are read
    beside their modules: importlib.resources (with its zip reader and tempfile)
    would be imported at every start (~5 ms of a `send`) in an interpreter whose
    site has not loaded it already (this probe runs without site's .pth files)."""
    probe = (
        f"import sys; sys.path[:0] = {sys.path!r}\n"
        "from fastsend.config.shaping import shipped_shaping\n"
        "from fastsend.bounce.reply import default_rules\n"
        "from fastsend.analytics.machine import load_machine_rules\n"
        "import fastsend.commands.send, fastsend.engine, fastsend.delivery.worker\n"
        "assert shipped_shaping().provider and default_rules().rules\n"
        "assert load_machine_rules()\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "fastsend.delivery.worker" in out  # the probe works
    assert not [m for m in out if m.startswith(("importlib.resources", "importlib.readers"))]
    assert "zipfile" not in out and "tempfile" not in out
