"""The pieces every settings module shares: :class:`ConfigError`, the
:class:`Section` base of every TOML table, and :func:`decode`, which turns a
parsed TOML value into a section and names the full key path of anything wrong
(``[submission] unknown key "listn"``, ``[api] max_body_bytes: expected int,
got str``, ``[shaping.domain."example.org"] burst: ...``)."""

from __future__ import annotations

import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

__all__ = [
    "HELO",
    "ConfigError",
    "NonNegFloat",
    "NonNegInt",
    "Port",
    "PosFloat",
    "PosInt",
    "Section",
    "Share",
    "decode",
    "read_toml",
    "set_fields",
    "split_listen",
    "validate_helo",
    "validate_ip",
    "where",
]

T = TypeVar("T")

# An EHLO name: a domain (letters, digits, hyphens, dots) or an address literal.
HELO = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]"
)

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
Share = Annotated[float, msgspec.Meta(ge=0, le=1)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid (the message names it)."""


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A TOML table: every key typed, unknown keys refused. ``__post_init__``
    raises ValueError for values its types cannot express; :func:`decode`
    names the table in the error."""


Path = tuple[str | int, ...]
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else '"' + k.replace('"', '\\"') + '"'


def where(path: Path) -> str:
    """``("shaping", "domain", "a.org")`` -> ``[shaping.domain."a.org"]``; list
    indexes as ``[reputation.blocklists[0]]``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + _key(p)
    return f"[{out}]"


def _at(path: Path) -> str:
    """A key's place: ``[api] max_body_bytes`` (table, then the key)."""
    if not path:
        return "(top level)"
    if len(path) == 1:
        return where(path)
    i = len(path) - 1
    while i > 0 and isinstance(path[i], int):
        i -= 1
    tail = where(path[i:])[1:-1]
    return f"{where(path[:i])} {tail}" if i else where(path)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return h


def _tname(v: Any) -> str:
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return type(v).__name__


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _container(tp: Any) -> Any:
    """``dict``/``list``/``tuple``/a Struct class: what kind of TOML value ``tp`` wants."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if _is_struct(tp):
        return dict
    o = get_origin(tp)
    return o if o in (dict, list, tuple) else None


def decode(value: Any, tp: Any, path: Path = ()) -> Any:
    """``value`` (parsed TOML) as type ``tp``; ConfigError naming the key path."""
    if _is_struct(tp):
        custom = getattr(tp, "config_decode", None)
        if custom is not None:
            return custom(value, path)
        return _struct(value, tp, path)
    origin = get_origin(tp)
    if origin is Annotated and _container(tp) is not None:
        return decode(value, get_args(tp)[0], path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path)} must be a table, not {_tname(value)}")
        _, vt = get_args(tp)
        return {k: decode(v, vt, (*path, k)) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{_at(path)}: expected an array, got {_tname(value)}")
        it = get_args(tp)[0]
        items = [decode(v, it, (*path, i)) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if isinstance(value, dict | list):
            want = dict if isinstance(value, dict) else list
            for a in args:
                c = _container(a)
                if c is want or (want is list and c is tuple):
                    return decode(value, a, path)
        leaves = [a for a in args if _container(a) is None and a is not msgspec.UnsetType]
        if leaves and not isinstance(value, dict | list):
            return _leaf(value, Union[tuple(leaves)] if len(leaves) > 1 else leaves[0], path)  # noqa: UP007
        kinds = " or ".join(_describe(a) for a in args if a is not msgspec.UnsetType)
        raise ConfigError(f"{_at(path)}: expected {kinds}, got {_tname(value)}")
    return _leaf(value, tp, path)


def _describe(tp: Any) -> str:
    c = _container(tp)
    if c is dict:
        return "a table"
    if c in (list, tuple):
        return "an array"
    return getattr(tp, "__name__", str(tp))


def _leaf(value: Any, tp: Any, path: Path) -> Any:
    if get_origin(tp) is Literal and value not in get_args(tp):
        allowed = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{_at(path)}: must be one of {allowed}, got {value!r}")
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError as e:
        msg = str(e).split(" - at `$", 1)[0].replace("`", "")
        raise ConfigError(f"{_at(path)}: {msg[:1].lower()}{msg[1:]}") from None


def _struct(value: Any, tp: type[T], path: Path) -> T:
    if not isinstance(value, dict):
        raise ConfigError(f"{where(path) if path else 'the config'} must be a table, not {_tname(value)}")
    hints = _hints(tp)
    known = tp.__struct_fields__  # type: ignore[attr-defined]
    kw: dict[str, Any] = {}
    for k, v in value.items():
        if k not in known:
            names = ", ".join(sorted(known))
            if not path:
                raise ConfigError(f"unknown section [{_key(k)}] (known: {names})")
            raise ConfigError(f'{where(path)} unknown key "{k}" (known: {names})')
        kw[k] = decode(v, hints[k], (*path, k))
    return build(tp, kw, path)


def build(tp: type[T], kw: dict[str, Any], path: Path) -> T:
    """``tp(**kw)``, its ``__post_init__`` errors named by the table."""
    try:
        return tp(**kw)
    except TypeError as e:  # a required key is missing
        m = re.search(r"argument '(\w+)'", str(e))
        what = f'needs key "{m.group(1)}"' if m else str(e)
        raise ConfigError(f"{where(path)} {what}") from None
    except ValueError as e:
        raise ConfigError(f"{where(path)} {e}") from None


def set_fields(s: msgspec.Struct) -> dict[str, Any]:
    """The fields of ``s`` that are set (not UNSET), as a dict."""
    return {
        f: v for f in s.__struct_fields__ if (v := getattr(s, f)) is not msgspec.UNSET
    }


def read_toml(
    path: str | FilePath, what: str, error: Callable[[str], Exception] = ConfigError
) -> dict[str, Any]:
    """The TOML file at ``path`` (``what`` it is: "shaping file"), parsed; else
    ``error(msg)`` naming the file and why (missing, unreadable, not UTF-8, not TOML)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        why = "not found" if isinstance(e, FileNotFoundError) else e.strerror or e
        raise error(f"cannot read {what} {str(path)!r}: {why}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid TOML: {e}") from None


def validate_ip(text: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an IP address") from None


def validate_helo(text: str, where: str) -> str:
    """An EHLO name as configured: a host name (an internationalised one in
    A-labels: EHLO comes before the server says it takes UTF-8) or an address
    literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``); ValueError otherwise."""
    t = text.strip()
    bad = ValueError(f"{where} {text!r} is not a host name or address literal")
    if t.startswith("["):
        inner = t[1:-1] if t.endswith("]") else ""
        v6 = inner[:5].lower() == "ipv6:"
        try:
            addr = ipaddress.ip_address(inner[5:] if v6 else inner)
        except ValueError:
            raise bad from None
        if (addr.version == 6) != v6:
            raise ValueError(f"{where} {text!r}: an IPv6 address literal is [IPv6:ADDRESS], "
                             "an IPv4 one [ADDRESS] (RFC 5321 4.1.3)")  # fmt: skip
        return t
    if not t.isascii():
        import idna  # IDNA 2008 + UTS 46, as fastsend.address.idna_domain (a higher layer)

        try:
            t = idna.encode(t, uts46=True).decode("ascii")
        except Exception:  # idna.IDNAError and its codec's other refusals
            raise bad from None
    if not HELO.fullmatch(t):
        raise bad
    return t


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_nameserver(ns: str) -> tuple[str, int]:
    """``ADDR``, ``V4:PORT`` or ``[V6]:PORT`` as (address, port); ValueError otherwise."""
    host, port = ns.strip(), "53"
    if host.startswith("["):
        host, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{ns!r} is not ADDR, ADDR:PORT or [IPv6]:PORT")
        port = rest[1:] or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{ns!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{ns!r}: bad port {port!r}")
    return host, int(port)


def check_listen(v: str, key: str) -> None:
    """ValueError unless ``v`` is ``HOST:PORT``."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{key} must be 'HOST:PORT', got {v!r}")
