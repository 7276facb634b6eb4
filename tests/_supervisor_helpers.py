"""The rings between a supervisor and its workers, read by a test that drives
one side in-process: what a Supervisor handed over (and its close), what a
Worker answered."""

from __future__ import annotations

from typing import Any

from fastsend import wire


def handed(sup: Any) -> list[int]:
    """The ids of the batches on the workers' inbox rings, read off them."""
    ids: list[int] = []
    for slot in sup.slots:
        assert slot.inbox is not None
        while (rec := slot.inbox.get()) is not None:
            msg = wire.to_worker_decoder.decode(rec)
            if isinstance(msg, wire.Batch):
                ids += [it.id for it in msg.items]
    return ids


def close_supervisor(sup: Any, spool: Any) -> None:
    """Closes what such a test's Supervisor opened (its suppression list, the
    slots' rings) and the spool."""
    sup.close_parts()
    spool.close()


def worker_results(outbox: Any) -> list[wire.Res]:
    """Every outcome a worker put in its outbox (a Ring)."""
    out: list[wire.Res] = []
    while (rec := outbox.get()) is not None:
        msg = wire.from_worker_decoder.decode(rec)
        if isinstance(msg, wire.Results):
            out += wire.expand(msg.items)
    return out
