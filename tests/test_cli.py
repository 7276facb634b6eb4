import subprocess
import sys

from fastsend import __version__
from fastsend.cli import COMMANDS


def fastsend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    r = fastsend("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"fastsend {__version__}"


def test_help_lists_every_command_with_one_line() -> None:
    r = fastsend("--help")
    assert r.returncode == 0
    for name, (_module, help_text) in COMMANDS.items():
        assert name in r.stdout
        assert help_text.split()[0] in r.stdout


def test_unknown_command_fails() -> None:
    r = fastsend("no-such-command")
    assert r.returncode != 0


def test_every_command_module_imports() -> None:
    import importlib

    for name, (module, _h) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments), name
        assert callable(mod.run), name
