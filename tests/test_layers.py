"""The static checks scripts/test runs hold on every landing too: the one-way
layers (pyproject.toml [tool.importlinter], ARCHITECTURE.md "Layers") by
import-linter over the real import graph (imports inside functions included),
and it really fails on an upward import (a throwaway package laid out like
ours); ruff; mypy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports")
    if exe is None:
        assert not IN_CI, "scripts/test installs import-linter"
        pytest.skip("import-linter is not installed (scripts/test installs it)")
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run(
        [exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layers_contract_is_kept() -> None:
    res = _lint_imports(ROOT, ROOT / "src")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


@pytest.mark.parametrize(
    ("module", "imported", "message"),
    [
        # the bottom layer reaching up to the engine
        ("address.py", "fastsend.queue.supervisor",
         "fastsend.address is not allowed to import fastsend.queue"),
        # one part of the supervisor reaching into a sibling part
        ("queue/dispatch.py", "fastsend.queue.outcomes",
         "fastsend.queue.dispatch is not allowed to import fastsend.queue.outcomes"),
        # a front end opening a spool backend instead of fastsend.spool
        ("commands/queue.py", "fastsend.spool.sqlite",
         "fastsend.commands.queue -> fastsend.spool.sqlite"),
    ],
)  # fmt: skip
def test_a_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, imported: str, message: str
) -> None:
    """The same contracts on a copy of the package with one import inside a
    function that a contract forbids: lint-imports must fail and name it."""
    pkg = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "fastsend", pkg / "fastsend",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(pkg / "fastsend" / module, "a") as f:
        f.write(f"\n\ndef _wrong() -> object:\n    import {imported}\n\n"
                f"    return {imported}\n")  # fmt: skip
    res = _lint_imports(tmp_path, pkg)
    assert res.returncode != 0
    assert message in " ".join(res.stdout.split()), res.stdout[-3000:]


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        assert not IN_CI, f"scripts/test installs {name}"
        pytest.skip(f"{name} is not installed")
    return exe


def test_ruff_is_clean() -> None:
    res = subprocess.run(
        [_tool("ruff"), "check", "src", "tests"], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:]


def test_mypy_is_clean() -> None:
    res = subprocess.run(
        [_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:]
