"""Child processes that die with their parent.

A process fastsend starts must not outlive the one that started it: a kill -9
of ``fastsend send``'s supervisor, of ``fastsend sink --workers N``'s parent,
of ``fastsend serve`` or ``fastsend demo`` leaves nobody to stop the children,
and a child left behind keeps delivering from a spool it does not own, keeps a
port bound, or just lingers (a parse-pool child of serve waited forever on a
queue nobody wrote). Linux's ``prctl(PR_SET_PDEATHSIG)`` has the kernel signal
the child when its parent dies. The setting survives ``exec``, so a child that
is a new program (``fastsend sink`` under :class:`fastsend.sink.SinkProcess`)
sets it itself at start from the parent's pid in :data:`PARENT_ENV`.

The kernel's "parent" is the *thread* that forked: a child started from a
thread that ends before the process gets the signal then. fastsend forks and
spawns from its main thread.

And a process whose terminal went away (:func:`leave_hung_up_terminal`): what
it still says goes where it can be read, not into an EIO.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
from typing import Any

from fastsend._accel import pick

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# The pid a fastsend command started by another fastsend process dies with
# (read and removed at its start: run_process).
PARENT_ENV = "FASTSEND_DIE_WITH_PARENT"


@functools.cache
def _prctl() -> Any:
    """libc's ``prctl`` (None where there is none), looked up once in the
    supervisor (``delivery.worker.prepare``): ``ctypes.util.find_library`` would
    run ``ldconfig -p`` in every worker, ~10 ms of CPU each."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # the process's own libc
    except (OSError, AttributeError):
        return None


def set_pdeathsig(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``): True when it is set. The compiled twin
    (``_proc.pxi``) calls prctl without ctypes."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


_py_set_pdeathsig = set_pdeathsig
set_pdeathsig = pick(set_pdeathsig)


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` (SIGKILL: nothing to finish for a parent
    that is gone, and the child's listening sockets close at once) to this
    process when its parent dies; if the parent is already gone (it died
    before the prctl: this process was handed to init or a subreaper), exit
    now with 3."""
    set_pdeathsig(sig)
    if os.getppid() != parent:
        os._exit(3)


def die_with_parent_from_env() -> None:
    """At a fastsend command's start: if the process that started it asked
    (:data:`PARENT_ENV` holds its pid), die with it. The variable is removed,
    so that this command's own children are not held to their grandparent."""
    value = os.environ.pop(PARENT_ENV, "")
    if value.isdigit():
        die_with_parent(int(value))


def hung_up_terminal(fd: int) -> bool:
    """Whether ``fd`` is a terminal that was hung up (the ssh session dropped,
    the window closed): the kernel answers its every write, and ``tcgetattr``,
    with EIO. A file, a pipe or a live terminal: False."""
    import termios  # (here: a command that never asks imports nothing for it)

    try:
        termios.tcgetattr(fd)
    except termios.error as e:
        return bool(e.args and e.args[0] == errno.EIO)
    except (OSError, ValueError):
        return False
    return False


def leave_hung_up_terminal() -> bool:
    """Point stdout and stderr that are a hung-up terminal at /dev/null, so that
    what a command says after a hangup goes to whichever of them still reaches
    someone (a ``2>log`` file) and the rest is dropped, as it would have been
    read by no one: before, the first write to the dead terminal (the summary)
    raised EIO, said as "the disk cannot be written" (exit 2, or 1 with a
    traceback) in place of the resume command and 129. True when one was."""
    gone = False
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            continue
        if not hung_up_terminal(fd):
            continue
        gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # what was buffered for the dead terminal: now dropped
    return gone
