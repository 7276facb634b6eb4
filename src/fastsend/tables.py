"""Flat TOML tables into settings dataclasses: the one loop the scalar sections share.

NAME
    fastsend.tables -- read_toml(path, what, error): a TOML file, parsed.
    load_table(cls, raw, section, ...): a settings dataclass from a table.

DESCRIPTION
    :func:`read_toml` reads the files fastsend is given (the config, campaign,
    shaping, bounce-rule and machine-rule files) one way: an error of the
    caller's class naming the file and what it is for when it is missing,
    unreadable, not UTF-8 or not TOML.

    Several areas read a section that is only scalars with defaults, declared as a
    dataclass: ``[api]``, ``[analytics]``, ``[guardrails]``, ``[reputation.alarms]``,
    ``[reputation.warmup]``. :func:`load_table` fills one from the parsed table and
    refuses, with a :class:`~fastsend.settings.ConfigError` naming the section and
    the key:

    - a section that is not a table, a key the dataclass does not have (the known
      keys are listed);
    - a value of another kind than the field's declared type (every field is a
      bool, str, int or float): ``true``/``false`` for a bool, a string for a
      str, an integer for an int, an integer or a float for a float (taken as a
      float); a bool is never a number;
    - an int under ``int_min``, a float outside ``float_min`` .. ``float_max``
      (``float_min`` itself excluded with ``float_min_open``).

    What a section checks beyond that (listen addresses, paths, relations
    between keys) stays with the section, after the call.

DELIBERATELY NOT HERE
    No nested tables or lists, no reading of files: fastsend.config loads the
    file and the sections with structure parse themselves.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastsend.settings import ConfigError

__all__ = ["load_table", "read_toml"]

T = TypeVar("T")


def read_toml(
    path: str | Path, what: str, error: Callable[[str], Exception] = ConfigError
) -> dict[str, Any]:
    """The TOML file at ``path`` (``what`` it is: "shaping file"), parsed; else ``error(msg)``."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        why = "not found" if isinstance(e, FileNotFoundError) else e.strerror or e
        raise error(f"cannot read {what} {str(path)!r}: {why}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid TOML: {e}") from None


def _misfit(kind: Any, v: Any, int_min: int, lo: float, hi: float, lo_open: bool) -> str:
    """What a field of type ``kind`` wants, when ``v`` is not that; "" when it is."""
    if kind is bool:
        return "" if isinstance(v, bool) else "true or false"
    if kind is str:
        return "" if isinstance(v, str) else "a string"
    number = isinstance(v, int | float) and not isinstance(v, bool)
    if kind is int:
        fits = number and isinstance(v, int) and v >= int_min
        return "" if fits else f"an integer >= {int_min}"
    fits = number and (v > lo if lo_open else v >= lo) and v <= hi
    if fits:
        return ""
    if hi < math.inf:
        return f"a number from {lo:g}{' (excluded)' if lo_open else ''} to {hi:g}"
    return f"a number {'>' if lo_open else '>='} {lo:g}"


def load_table(
    cls: type[T],
    raw: Any,
    section: str,
    *,
    int_min: int = 0,
    float_min: float = 0.0,
    float_max: float = math.inf,
    float_min_open: bool = False,
) -> T:
    """``cls()`` with the keys of the TOML table ``raw`` (section ``[section]``) set."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    s = cls()
    hints = typing.get_type_hints(cls)
    kinds = {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k, v in raw.items():
        if k not in kinds:
            names = ", ".join(sorted(kinds))
            raise ConfigError(f"[{section}] unknown key {k!r} (known: {names})")
        want = _misfit(kinds[k], v, int_min, float_min, float_max, float_min_open)
        if want:
            raise ConfigError(f"[{section}] {k} has a bad value {v!r}: it must be {want}")
        setattr(s, k, float(v) if kinds[k] is float else v)
    return s
