"""A Supervisor driven in-process by a test (no workers: its slots' rings are
read by the test): what it handed over, and its close."""

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
    sup.suppression.close()
    for slot in sup.slots:
        for ring in (slot.inbox, slot.outbox):
            if ring is not None:
                ring.close()
    spool.close()
