"""Choose the compiled Cython core or its pure-Python twin.

Every hot function or class has a readable pure-Python version (the reference)
and, in ``fastsend._core``, a compiled one with the same name and behaviour.
Code binds the chosen one through :func:`pick`, the one idiom for every
twin, at the end of the module that defines the reference version: a function
is rebound under its own name; a class first keeps the reference under
``Py<Name>`` (tests and type checkers use it) (``fastsend/ring.py``)::

    from fastsend._accel import pick

    def dot_stuff(data: bytes) -> bytes: ...   # the reference implementation
    dot_stuff = pick(dot_stuff)                # fastsend._core.dot_stuff if built

    class Ring: ...
    PyRing: Final = Ring
    if not TYPE_CHECKING:
        Ring = pick(PyRing)

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
    """The compiled object ``name`` from ``fastsend._core`` (ImportError if absent):
    tests compare each twin against its reference."""
    if _core is None or not hasattr(_core, name):
        raise ImportError(f"fastsend._core has no {name!r} (extension not built?)")
    return getattr(_core, name)


def pick(pure: T) -> T:
    """Return the compiled twin of ``pure`` unless extensions are off or missing."""
    if NO_EXTENSIONS or _core is None:
        return pure
    return getattr(_core, getattr(pure, "__name__", ""), pure)
