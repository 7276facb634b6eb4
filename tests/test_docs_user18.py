"""A new user's first hour: README.md, docs/ and the examples, followed literally.

Each test is a claim the documentation makes (or a thing a user of the CLI expects
from it) checked against what the commands do."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from fastsend.sink import SinkThread

ROOT = Path(__file__).resolve().parent.parent

CAMPAIGN = """\
from = "News <news@example.com>"
subject = "Hello {{ first_name }}"
text = "Hi {{ first_name }}, ..."
html = "<p>Hi {{ first_name }}, ...</p>"
"""


def fastsend(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_send_counts_every_accepted_recipient_and_warns_of_no_crash(tmp_path: Path) -> None:
    """`fastsend send` accepts the list's first chunk before the engine starts. The
    rollups (`fastsend top`, /v1/stats) were attached after it: on a fresh spool the
    first chunk's accepted events were never counted (top: accepted 0, delivered 2),
    and every later send warned "the last run stopped without its last flush" after a
    run that ended cleanly."""
    (tmp_path / "campaign.toml").write_text(CAMPAIGN)
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\nb@example.org,B\n")
    with SinkThread() as sink:
        for _ in range(2):
            r = fastsend(
                "send", "campaign.toml", "-r", "list.csv", "--no-dkim", "--no-progress",
                "--route", f"*=127.0.0.1:{sink.port}", "--helo", "mta.example.com",
                "--spool", "spool", cwd=tmp_path,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "rollups missed" not in r.stderr
    top = fastsend("top", "--once", "--spool", "spool", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", top.stdout)
    accepted = re.search(r"accepted\s+([\d,]+)\s+delivered\s+([\d,]+)", plain)
    assert accepted is not None, plain
    assert (accepted.group(1), accepted.group(2)) == ("4", "4")


def test_the_example_campaigns_own_instructions_work(tmp_path: Path) -> None:
    """examples/campaign.toml opens with the commands that send it. They said
    `fastsend send examples/campaign.toml recipients.csv` (send takes the list only as
    --recipients: exit 2), never made the keys its [[dkim]] tables name (exit 2, "key
    file not found", no word of keygen), and `dkim keygen --out keys/...` failed on
    the directory not made yet. Each command of the comment is run here as written,
    plus a route to a local sink for the send."""
    import shutil

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    head = (ROOT / "examples" / "campaign.toml").read_text().split("\n\n", 1)[0]
    commands = [
        ln[1:].strip() for ln in head.splitlines() if ln[1:].strip().startswith("fastsend ")
    ]
    assert [c.split()[1] for c in commands] == ["dkim", "dkim", "send"], commands
    (tmp_path / "recipients.csv").write_text("email,first_name,code\na@example.org,A,X1\n")
    with SinkThread() as sink:
        for c in commands:
            args = c.split()[1:]
            if args[0] == "send":
                args += ["--route", f"*=127.0.0.1:{sink.port}", "--helo", "mta.example.com",
                         "--no-progress", "--spool", "spool"]  # fmt: skip
            r = fastsend(*args, cwd=tmp_path)
            assert r.returncode == 0, (c, r.stderr)
        assert len(sink.messages) == 1
        data = sink.messages[0].data
    # Its [tracking] opens and clicks are on: the pixel and the links go through its
    # base_url, signed with the spool's secret, which serve on that spool checks them with.
    from email import message_from_bytes, policy

    from fastsend.message.tracking import verify

    msg = message_from_bytes(data, policy=policy.default)
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    tokens = re.findall(r'https://t\.example\.com/t/([oc])/([\w.-]+?)(?:\.gif)?"', html)
    assert {kind for kind, _ in tokens} == {"o", "c"}, html
    secret = (tmp_path / "spool" / "secret.key").read_bytes().strip()
    assert all(verify(secret, token) is not None for _, token in tokens)


def test_a_missing_dkim_key_says_how_to_make_it(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        CAMPAIGN + '[dkim]\ndomain = "example.com"\nselector = "s1"\nkey = "k/s1.pem"\n'
    )
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    r = fastsend("send", "c.toml", "-r", "list.csv", "--spool", "spool", cwd=tmp_path)
    assert r.returncode == 2
    assert "key file not found" in r.stderr
    hint = re.search(r"`(fastsend dkim keygen [^`]+)`", r.stderr)
    assert hint is not None, r.stderr
    assert fastsend(*hint.group(1).split()[1:], cwd=tmp_path).returncode == 0
    assert (tmp_path / "k" / "s1.pem").is_file()


# -- every config key is in examples/fastsend.toml, and every key there is one ----------

_STAR = "*"


def _structs_of(tp: Any) -> list[type]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [tp]
    return [s for a in typing.get_args(tp) for s in _structs_of(a)]


def _owner(cls: type, name: str) -> str:
    """The class that declares field ``name`` (a key inherited, as ListenerLimits' by
    [submission] and [intake], is documented once for all its tables)."""
    for c in cls.__mro__:
        if name in getattr(c, "__annotations__", {}):
            return f"{c.__name__}.{name}"
    return f"{cls.__name__}.{name}"


def _table(cls: type) -> dict[str, Any]:
    """A struct as {key: (owner, sub-table or None)}; a dict of structs as {'*': ...}."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in msgspec.structs.fields(cls):
        tp, sub = hints[f.name], None
        for a in [tp, *typing.get_args(tp)]:
            if typing.get_origin(a) is dict:
                vals = _structs_of(typing.get_args(a)[1])
                # a table per name ([transports.NAME]), or a name per value (documented
                # with the key: tenants = { acme = "warm" })
                sub = {_STAR: (_owner(cls, f.name), _table(vals[0]) if vals else None)}
                break
        else:
            inner = _structs_of(tp)
            sub = _table(inner[0]) if inner else None
        out[f.encode_name] = (_owner(cls, f.name), sub)
    return out


def _config_tree() -> dict[str, Any]:
    from fastsend.config.loader import ConfigFile

    tree = _table(ConfigFile)
    owner, pools = tree["pools"]  # [pools.NAME] is written at the [pools] level
    named = pools.pop("pools")[1]
    tree["pools"] = (owner, {**pools, **named})
    return tree


def _resolve(tree: dict[str, Any], parts: list[str]) -> list[tuple[str, Any]] | None:
    """The (owner, sub-table) of each part of a dotted path, or None: no such key."""
    node: Any = tree
    out = []
    for p in parts:
        if not isinstance(node, dict):
            return None
        got = node.get(p, node.get(_STAR))
        if got is None:
            return None
        out.append(got)
        node = got[1]
    return out


_HEADER = re.compile(r'^#?\s*\[\[?\s*([A-Za-z0-9_.\-"]+)\s*\]\]?\s*(#.*)?$')
_KEY = re.compile(r'^#?\s?("?[A-Za-z0-9_.\-]+"?)\s*=\s*(.*)$')


def _documented(text: str) -> tuple[set[str], list[str]]:
    """The keys the example names (as their declaring class.field), and each of its
    lines that names no key (a table or key the loader would refuse)."""
    tree = _config_tree()
    keys: set[str] = set()
    bad: list[str] = []
    table: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = _HEADER.match(s)
        if m:
            table = [p.strip('"') for p in re.findall(r'"[^"]*"|[^."]+', m.group(1))]
            got = _resolve(tree, table)
            if got is None:
                bad.append(f"line {n}: [{m.group(1)}]")
                table = []
            else:
                keys |= {owner for owner, _ in got}
            continue
        m = _KEY.match(s)
        if not m:
            continue
        got = _resolve(tree, [*table, m.group(1).strip('"')])
        if got is None:
            bad.append(f"line {n}: [{'.'.join(table)}] {m.group(1)}")
            continue
        keys |= {owner for owner, _ in got}
        sub = got[-1][1]
        if isinstance(sub, dict) and _STAR in sub:
            sub = sub[_STAR][1]
        if isinstance(sub, dict) and "{" in m.group(2):  # an inline table's keys
            for k in re.findall(r"[{,]\s*([A-Za-z_]+)\s*=", m.group(2)):
                if k in sub:
                    keys.add(sub[k][0])
                else:
                    bad.append(f"line {n}: {m.group(1)} {{ {k} = ... }}")
    return keys, bad


def _every_key(node: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for owner, sub in node.values():
        out.add(owner)
        if isinstance(sub, dict):
            out |= _every_key(sub)
    return out


def test_every_config_key_is_in_the_example_and_no_other() -> None:
    """README: "Every option is in the commented examples/fastsend.toml". 145 of the
    loader's 282 keys were not ([delivery] connect_timeout and drain_limit, [api]
    admin_listen / public_listen, [submission.users], [proxy], [tenants], [pools],
    [shaping] limits and rules, [reputation], ...), and a config comment named a command
    that does not exist. Every key (commented or not) of the example is one the loader
    takes, in its table; every key the loader takes is in the example."""
    text = (ROOT / "examples" / "fastsend.toml").read_text()
    keys, bad = _documented(text)
    assert not bad, bad
    missing = sorted(_every_key(_config_tree()) - keys)
    assert not missing, missing


# -- every fastsend command the documentation shows parses -----------------------------


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises instead of exiting (its subparsers too)."""

    def error(self, message: str) -> NoReturn:
        raise _Refused(message)


def _optional_all(p: argparse.ArgumentParser) -> None:
    """A documented command may leave out what it needs (`fastsend send` in prose): only
    what it names is checked (a subcommand, an option, a value)."""
    for a in p._actions:
        a.required = False
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                _optional_all(sub)
        elif not a.option_strings and a.nargs is None:
            a.nargs = "?"


def _parse_cli(words: list[str]) -> str | None:
    """What the `fastsend` command line ``words`` (after the program name) is refused
    for, or None."""
    import importlib

    from fastsend.cli import COMMANDS

    if not words or words[0].startswith("-"):
        return None if not words or words[0] in ("--help", "--version") else words[0]
    if words[0] not in COMMANDS:
        return f"no command {words[0]!r}"
    p = _Parser(prog=f"fastsend {words[0]}")
    importlib.import_module(COMMANDS[words[0]][0]).add_arguments(p)
    _optional_all(p)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help
            p.parse_args(words[1:])
    except _Refused as e:
        if str(e).endswith("expected one argument") and words[-1].startswith("-"):
            return None  # an option named in prose (`fastsend send --pool`)
        return str(e)
    except SystemExit:  # --help printed
        pass
    return None


def _doc_commands() -> list[tuple[str, str]]:
    """(file, command) for each `fastsend ...` the docs show: Markdown code spans (a span
    may cross a line) and code blocks, the example files' and the unit's command lines."""
    out: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "ARCHITECTURE.md",
                 *sorted((ROOT / "docs").glob("*.md"))]:  # fmt: skip
        text = path.read_text()
        code = re.findall(r"(?m)^(?: {4}|\t)\s*(fastsend [^\n#]*(?:\\\n[^\n#]*)*)", text)
        spans = re.findall(r"`(fastsend [^`]+)`", re.sub(r"\n\s*", " ", text))
        out += [(path.name, c.replace("\\\n", " ")) for c in code + spans]
    for path in [*sorted((ROOT / "examples").glob("*.toml")), *sorted((ROOT / "deploy").iterdir())]:
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*#\s*(fastsend [^#]*)", line) or re.search(
                r"(?:ExecStart=\S*/|`)(fastsend [^`#]*)", line
            )
            if m:
                out.append((path.name, m.group(1)))
    return out


def test_every_documented_command_parses() -> None:
    """DEPLOY.md told a new node's operator `fastsend apikey create TENANT -c fastsend.toml`
    (an error: the tenant is --tenant) and the config's comment `fastsend apikey
    hash-password` (no such command). Every `fastsend ...` in README, SECURITY,
    ARCHITECTURE, docs/, examples/ and deploy/ names a command, options and values that
    the command takes."""
    found = _doc_commands()
    assert len(found) > 40, found  # the extraction still finds them
    refused = []
    for where, cmd in found:
        words = shlex.split(cmd.replace("\\", " "))
        if len(words) > 1 and words[1].endswith(":"):
            continue  # a message quoted ("fastsend serve: durability: ..."), no command
        why = _parse_cli(words[1:])
        if why:
            refused.append(f"{where}: {cmd.strip()}: {why}")
    assert not refused, "\n".join(refused)


def test_every_option_of_every_command_says_what_it_does() -> None:
    """`fastsend suppress list --help` showed --all-tenants and --include-expired with no
    word, `campaign --help` its actions, `dkim keygen --help` --algorithm: every argument
    of every command (and subcommand) has a help text."""
    import importlib

    from fastsend.cli import COMMANDS

    silent: list[str] = []

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for k, sub in a.choices.items():
                    walk(sub, f"{name} {k}")
            elif not a.help and not isinstance(a, argparse._HelpAction):
                silent.append(f"fastsend {name}: {'/'.join(a.option_strings) or a.dest}")

    for name, (module, _) in COMMANDS.items():
        p = argparse.ArgumentParser(prog=f"fastsend {name}")
        importlib.import_module(module).add_arguments(p)
        walk(p, name)
    assert not silent, silent


def test_tracking_without_a_base_url_is_refused_not_dropped(tmp_path: Path) -> None:
    """A campaign asking for opens or clicks with no [tracking] base_url was sent with
    neither (no pixel, no link rewritten), saying nothing: every open and click of it was
    lost. The example campaign was such a one."""
    (tmp_path / "c.toml").write_text(CAMPAIGN + "[tracking]\nopens = true\nclicks = true\n")
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    r = fastsend("send", "c.toml", "-r", "list.csv", "--no-dkim", "--spool", "spool",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2
    assert "opens and clicks need base_url" in r.stderr, r.stderr


def test_hash_password_makes_a_submission_users_entry(tmp_path: Path) -> None:
    """[submission] users said "tenant = password hash (fastsend apikey hash-password)",
    a command that did not exist: a password could only be hashed from Python."""
    from fastsend.serve.listeners import verify_password

    def run(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fastsend", "apikey", "hash-password", *args],
            input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    r = run("correct horse battery\n", "--tenant", "acme")
    assert r.returncode == 0, r.stderr
    assert "correct horse" not in r.stdout + r.stderr
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        '[submission]\nlisten = "127.0.0.1:2587"\ntls_cert = "c.pem"\ntls_key = "c.key"\n'
        "[submission.users]\n" + r.stdout
    )
    import tomllib

    stored = tomllib.loads(cfg.read_text())["submission"]["users"]["acme"]
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse", stored)
    assert run("short\n").returncode == 2


def test_top_once_into_a_pipe_is_plain_text(tmp_path: Path) -> None:
    """`fastsend top --once > file` wrote bold/colour escape sequences and "(q quits)"."""
    (tmp_path / "campaign.toml").write_text(CAMPAIGN)
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    with SinkThread() as sink:
        r = fastsend(
            "send", "campaign.toml", "-r", "list.csv", "--no-dkim", "--no-progress",
            "--route", f"*=127.0.0.1:{sink.port}", "--spool", "spool", cwd=tmp_path,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    top = subprocess.run(
        [sys.executable, "-m", "fastsend", "top", "--once", "--spool", "spool"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert top.returncode == 0, top.stderr
    assert "BY CAMPAIGN" in top.stdout
    assert "\x1b" not in top.stdout and "q quits" not in top.stdout


def test_suppress_import_takes_other_tools_exports(tmp_path: Path) -> None:
    """`fastsend send` reads a list whose address column is "Email Address" (Mailchimp),
    "Email" or "E-mail"; `suppress import` of such an export (the unsubscribed people a
    new user brings along) failed: "line 1: malformed address: 'Email Address,...'"."""
    (tmp_path / "unsub.csv").write_text(
        "Email Address,First Name,UNSUB_TIME\nq@example.org,Q,2024-01-02\nr@example.org,R,\n"
    )
    r = fastsend("suppress", "import", "unsub.csv", "--spool", "spool", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = fastsend("suppress", "list", "--spool", "spool", cwd=tmp_path)
    assert {ln.split()[0] for ln in listed.stdout.splitlines()} == {
        "q@example.org", "r@example.org"}  # fmt: skip


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """`fastsend queue --json | head -c 300` ended in a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        r = subprocess.run(
            [sys.executable, "-m", "fastsend", "dkim", "keygen", "--domain", "example.com",
             "--selector", "s1", "--algorithm", "ed25519"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
    finally:
        os.close(write)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr


def test_send_on_a_shared_spool_signs_as_its_serve_nodes(tmp_path: Path, redis_server: Any) -> None:
    """README: spool once on Redis, run a serve node per machine. `fastsend send` on
    that spool signed VERP return paths (and Message-IDs, tracking links) with its
    local directory's secret.key, while every serve node signs and checks with the
    cluster's shared secret: the intake matched none of the bounces of what send
    sent (a hard bounce suppressed no one), nor a click or unsubscribe."""
    from fastsend import msgid
    from fastsend.cluster import ClusterNode
    from fastsend.spool import open_spool

    url = redis_server.url(node="n1", dir=str(tmp_path / "local"))
    (tmp_path / "c.toml").write_text(CAMPAIGN + 'verp_domain = "bounces.example.com"\n')
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    with SinkThread() as sink:
        r = fastsend(
            "send", "c.toml", "-r", "list.csv", "--no-dkim", "--no-progress",
            "--route", f"*=127.0.0.1:{sink.port}", "--spool", url, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        mail_from = sink.messages[0].mail_from
    local, _, domain = mail_from.partition("@")
    assert domain == "bounces.example.com" and local.startswith("b-"), mail_from
    spool = open_spool(url)
    try:
        shared = spool.shared()
        assert shared is not None
        secret = ClusterNode(shared.client, shared.prefix, "any").shared_secret()
    finally:
        spool.close()
    assert msgid.parse(local[2:], secret) is not None


def test_spool_commands_take_the_config_as_serve_does(tmp_path: Path) -> None:
    """An operator runs `fastsend serve -c /etc/fastsend/fastsend.toml`; `queue`,
    `campaign` and `suppress` refused -c ("unrecognized arguments") and read ./spool
    (or demanded --spool) instead of the config's [spool]."""
    (tmp_path / "f.toml").write_text('[spool]\ndir = "var/spool"\n')
    (tmp_path / "campaign.toml").write_text(CAMPAIGN)
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    with SinkThread() as sink:
        r = fastsend(
            "send", "campaign.toml", "-r", "list.csv", "--no-dkim", "--no-progress",
            "--route", f"*=127.0.0.1:{sink.port}", "-c", "f.toml", cwd=tmp_path,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = fastsend("suppress", "add", "x@example.org", "-c", "f.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = fastsend("suppress", "list", "--spool", "var/spool", cwd=tmp_path)
    assert listed.stdout.startswith("x@example.org"), listed
    r = fastsend("campaign", "list", "--json", "-c", "f.toml", cwd=tmp_path)
    assert r.returncode == 0 and '"delivered":1' in r.stdout, r
    r = fastsend("queue", "--json", "-c", "f.toml", cwd=tmp_path)
    assert r.returncode == 0 and '"delivered":1' in r.stdout, r
    assert not (tmp_path / "spool").exists()
    r = fastsend("suppress", "list", cwd=tmp_path)
    assert r.returncode == 2 and "-c CONFIG" in r.stderr


def test_a_password_in_clear_in_submission_users_is_a_config_error(tmp_path: Path) -> None:
    """`acme = "s3cret"` in [submission.users] passed check-config; every AUTH of acme
    then failed (535) with nothing saying why, the password sitting in the file."""
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "c.key").write_text("x")
    base = '[submission]\nlisten = "127.0.0.1:2587"\ntls_cert = "c.pem"\ntls_key = "c.key"\n'
    (tmp_path / "f.toml").write_text(base + '[submission.users]\nacme = "s3cret"\n')
    r = fastsend("check-config", "f.toml", cwd=tmp_path)
    assert r.returncode == 2, r
    assert "'acme' is not a password hash" in r.stderr
    assert "fastsend apikey hash-password --tenant acme" in r.stderr
    assert "s3cret" not in r.stderr + r.stdout


def test_a_source_ip_this_machine_lacks_is_an_error_not_a_silent_deferral(
    tmp_path: Path,
) -> None:
    """README's `fastsend send ... --source-ip 203.0.113.10,203.0.113.11` on a machine
    without those addresses deferred every message ("Cannot assign requested address",
    in the event log only), exit 0, and went on deferring until expiry."""
    from fastsend.config import from_dict
    from fastsend.delivery.ehlo import foreign_ips

    (tmp_path / "campaign.toml").write_text(CAMPAIGN)
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    r = fastsend(
        "send", "campaign.toml", "-r", "list.csv", "--no-dkim", "--no-progress",
        "--route", "*=127.0.0.1:9", "--source-ip", "127.0.0.2,192.0.2.10",
        "--spool", "spool", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r
    assert "192.0.2.10" in r.stderr and "not an address of this machine" in r.stderr
    assert "127.0.0.2" not in r.stderr
    assert not (tmp_path / "spool" / "spool.db").exists()  # nothing was spooled
    pools = from_dict({"pools": {"main": {"ips": ["127.0.0.3", "198.51.100.7"]}}})
    assert [ip for ip, _ in foreign_ips(pools)] == ["198.51.100.7"]
