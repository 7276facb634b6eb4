"""Files that must outlive a power loss, not only a kill -9.

A ``write`` is in the kernel's page cache: a killed process loses nothing, a
power loss (or a kernel crash) loses what was not fsynced. A new file's name
is in its directory, which is a file of its own: fsyncing the new file does
not make its name durable, fsyncing the directory does (fsync(2), "Calling
fsync() does not necessarily ensure that the entry in the directory containing
the file has also reached disk"); the same holds for ``rename``/``link``. The
journals that promise something after an answer (``serve/dsn.py``'s
``dsn.journal``, ``serve/idempotency.py``'s ``held.jsonl``), the installation
secret (``msgid.load_secret``) and the directories a spool's files are made in
(``sqlitedb.connect``, uploads, serve's spool directory) go through these.
"""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` durable (a file created, renamed,
    linked or removed in it)."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs(path: str, mode: int = 0o777) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``, each directory it creates made
    durable in its parent (a spool directory made by its first command: the
    mail accepted into it lost with its name at a power loss)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        makedirs(parent)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if os.path.isdir(path):
            return
        raise
    fsync_dir(parent)


def open_append(path: str, mode: int = 0o600) -> int:
    """``path`` opened to append (created if missing, its name then made durable
    before it is written); the fd."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    try:
        fsync_dir(os.path.dirname(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace(data: bytes, path: str, mode: int = 0o600, *, exclusive: bool = False) -> None:
    """``path``'s content replaced by ``data`` at once, durably: written to a
    temporary file, fsynced, renamed over ``path``, the directory fsynced (a
    power loss leaves the old content or the new, never an empty file; a full
    disk leaves the old one and no temporary file). ``exclusive``: ``path``
    must not exist yet (linked, not renamed: FileExistsError, atomically)."""
    tmp = f"{path}.tmp"  # (one writer per file: a leftover is overwritten)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # (a leftover's mode, or the umask's: this one)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)  # (renamed: gone already; linked or failed: not needed)
        except OSError:
            pass
    fsync_dir(os.path.dirname(path))
