"""Choose the compiled Cython core or its pure-Python twin.

Every hot function or class has a readable pure-Python version (the reference)
and, in ``fastsend._core``, a compiled one with the same name and behaviour.
Code imports the chosen one through :func:`pick`::

    from fastsend._accel import pick
    from fastsend.rings import _ring_py
    Ring = pick(_ring_py.Ring)

Setting ``FASTSEND_NO_EXTENSIONS=1`` forces the pure-Python versions (as
aiohttp's ``AIOHTTP_NO_EXTENSIONS``). If the extension is not built, the pure
versions are used and :data:`HAVE_EXTENSIONS` is False.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

NO_EXTENSIONS = os.environ.get("FASTSEND_NO_EXTENSIONS", "") not in ("", "0")

_core: ModuleType | None
try:
    from fastsend import _core as _core_mod

    _core = _core_mod
except ImportError:  # not built (e.g. a source checkout without `pip install -e .`)
    _core = None

HAVE_EXTENSIONS = _core is not None


def compiled(name: str) -> Any:
    """The compiled object ``name`` from ``fastsend._core`` (ImportError if absent)."""
    if _core is None or not hasattr(_core, name):
        raise ImportError(f"fastsend._core has no {name!r} (extension not built?)")
    return getattr(_core, name)


def pick(pure: T) -> T:
    """Return the compiled twin of ``pure`` unless extensions are off or missing."""
    if NO_EXTENSIONS or _core is None:
        return pure
    return getattr(_core, getattr(pure, "__name__", ""), pure)
