"""Helpers for the message-area tests: choosing py/c twins, DKIM keys, verifiers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fastsend import _accel
from fastsend.message import dkim as dkim_mod
from fastsend.message import mime as mime_mod


def use_impl(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """Make the message modules use the pure ('py') or compiled ('c') twins."""
    for mod in (mime_mod, dkim_mod):
        for name, pure in mod.PURE.items():
            fn = pure if impl == "py" else _accel.compiled(name)
            monkeypatch.setattr(mod, name, fn)


def opendkim_verify(exe: str, tmp: Path, message: bytes, keys: dict[str, str]) -> str:
    """OpenDKIM's verdict line for the first DKIM-Signature of ``message``.

    ``keys`` maps ``selector._domainkey.domain`` to the TXT value.
    """
    keyfile = tmp / "keys"
    keyfile.write_text("".join(f"{n} {v}\n" for n, v in keys.items()))
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keyfile}\nSyslog no\n")
    msgfile = tmp / f"msg-{os.getpid()}.eml"
    msgfile.write_bytes(message)
    out = subprocess.run(
        [exe, "-x", str(conf), "-t", str(msgfile)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout + out.stderr


def drop_first_signature(message: bytes) -> bytes:
    """``message`` without its first DKIM-Signature header (to verify the next one)."""
    head, sep, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    dropping = False
    dropped = False
    for ln in lines:
        if not dropped and ln.lower().startswith(b"dkim-signature:"):
            dropping = dropped = True
            continue
        if dropping and ln[:1] in (b" ", b"\t"):
            continue
        dropping = False
        out.append(ln)
    return b"\r\n".join(out) + sep + body
