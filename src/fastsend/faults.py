"""Crash points for the crash tests (inert unless ``FASTSEND_TEST_FAULT`` is set).

``FASTSEND_TEST_FAULT=NAME:N`` makes the N-th pass (counted over the process,
default 1) of the point NAME signal this process: the tests kill a process
(SIGKILL) or freeze it (SIGSTOP) at the exact step between two writes whose
order they prove. One countdown per process: a process runs one fault.
"""

from __future__ import annotations

import os
import signal

FAULT = os.environ.get("FASTSEND_TEST_FAULT", "")  # read once: a forked worker inherits it
_left: list[int] = []


def countdown(points: dict[str, signal.Signals]) -> None:
    """One pass of a crash point: *points* maps the fault names this place
    answers to the signal each sends once its count runs out."""
    name, _, arg = FAULT.partition(":")
    sig = points.get(name)
    if sig is None:
        return
    if not _left:
        _left.append(int(arg or 1))
    _left[0] -= 1
    if _left[0] == 0:
        os.kill(os.getpid(), sig)
