"""Mounts for the length of a test (root only: CI runs as root): a small tmpfs
(a disk that fills), a bind of a directory made read-only (a snapshot, a file
system remounted read-only after a disk error)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(where: Path, *opts: str, read_only: bool = False) -> Iterator[None]:
    """A mount at ``where`` (``opts``: mount's arguments before the target) for
    the block's length; ``read_only``: remounted read-only at once (a bind
    takes no ``ro`` at its first mount)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount): CI runs as root")
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", *opts, str(where)], check=True)
    try:
        if read_only:
            bind = ",bind" if "--bind" in opts else ""
            subprocess.run(["mount", "-o", f"remount{bind},ro", str(where)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
