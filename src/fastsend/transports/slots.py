"""A transport's connections shared by the worker processes of one node.

``max_connections`` of a relay or provider is the total across every worker.
Split in equal parts it is a whole number each only when there are at least
as many connections as workers: with fewer (a relay that takes 2 sessions,
16 workers) each worker needs one it may use *when* the others do not.
:class:`Slots` is that: ``total`` places, each a byte of one file in
``SPOOL/transport-slots/`` locked with ``fcntl.lockf`` (POSIX record locks
belong to the process: the kernel drops them when it exits, so a worker
killed while sending leaks none, and a reload's retiring worker keeps its
places until its last request ends). A place is taken without waiting
(non-blocking); a worker that found none and holds none marks itself waiting
(its own byte past ``WANT``) and tries again shortly, and a worker that frees a place while
another waits lets it go first (:meth:`Slots.others_waiting`): without that,
the worker that freed a place took it again in the same callback and the
others never got one.
"""

from __future__ import annotations

import fcntl
import os

WANT = 1 << 20  # offset of the workers' "waiting" bytes (index i at WANT + i)


class Slots:
    """``total`` places shared by the processes that open ``path``."""

    def __init__(self, path: str, index: int, total: int) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.index = index
        self.total = total
        self.held: set[int] = set()
        self.wanting = False

    def _try(self, i: int) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)
        except OSError:  # EAGAIN / EACCES: another process holds it
            return False
        return True

    def _unlock(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, i)

    def acquire(self, want: bool = True) -> int | None:
        """A free place (this process holds it until :meth:`release`), or None
        when every one is held; then, with ``want`` (this worker holds none:
        it cannot send at all), it counts as waiting. A worker that has some
        and would like more does not: the others would give up theirs in
        turn, a new session each time, for no gain in the total."""
        for i in range(self.total):
            if i not in self.held and self._try(i):
                self.held.add(i)
                self.unwant()
                return i
        if want and not self.wanting:
            self.wanting = self._try(WANT + self.index)
        return None

    def unwant(self) -> None:
        """No longer waiting (nothing left to send, paused): a waiting mark
        left behind would have the others give way to no one."""
        if self.wanting:
            self.wanting = False
            self._unlock(WANT + self.index)

    def release(self, i: int) -> None:
        if i in self.held:
            self.held.discard(i)
            self._unlock(i)

    def others_waiting(self, workers: int) -> bool:
        """Whether another of ``workers`` is waiting for a place."""
        for j in range(workers):
            if j == self.index:
                continue
            if not self._try(WANT + j):
                return True
            self._unlock(WANT + j)
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # (drops every lock this process holds on it)
            self.fd = -1
            self.held.clear()
