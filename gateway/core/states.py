"""The states of one (message, recipient) pair, as neutral values shared by the queue and the pipeline steps.

The pipeline steps (``gateway.process``) say which state their verdict puts a recipient in; the
queue (``gateway.queue``) owns the table of allowed transitions (``gateway.queue.models.TRANSITIONS``)
and enforces it when it commits the verdict.  Both import the names from here, so that the steps
never import the queue.
"""

from __future__ import annotations

import enum

__all__ = ["PENDING", "RELEASED", "RecipientState"]


class RecipientState(enum.StrEnum):
    QUEUED = "queued"  # waiting for its first attempt
    DEFERRED = "deferred"  # a temporary failure; retried at next_attempt_at
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # failed for good; a DSN went to the sender
    QUARANTINED = "quarantined"  # inbound message that failed verification; kept aside
    DELETED = "deleted"  # removed by an admin (reason recorded)

    @property
    def final(self) -> bool:
        return self in {RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.DELETED}


#: States a worker still has something to do for.
PENDING = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED})
#: The protection of a recipient an admin released from quarantine: delivered as is, never re-judged.
RELEASED = "released-by-admin"
