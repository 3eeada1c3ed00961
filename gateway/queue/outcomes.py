"""Record everything a worker learnt about one message in one database transaction.

The job: the pipelines collect their verdicts while they work (``OutcomeBatch``: recipient
states, replies, protections, audit events, the inbound verification result); ``commit``
writes them and gives the claim back in a single transaction, instead of one transaction per
recipient, one for the verification result and one for the release; ``commit_many`` does so for
the messages of several workers at once (group commit: one lock and one fsync for all).  The message's ``done``
flag follows its recipients; the next attempt of what is still pending is asked of
``schedule(attempts)`` (the worker's backoff, capped at the expiry).

Semantics are those of ``QueueStore.set_recipient_state`` then ``QueueStore.release``: outcomes
are written even when the lease was lost in the meantime (what happened on the wire happened),
the claim is only cleared when it is still ours.  A crash before the commit loses the outcomes
and the lease expires: the message is redone (at least once; peers drop the duplicate by its
dedupe key).

Errors: database errors propagate (the worker logs them; the lease then expires and the
message is retried).  An outcome for an address the message does not have is logged and
skipped rather than failing the whole batch.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from gateway.audit.trail import AuditEvent, append
from gateway.queue.models import QueuedMessage, RecipientState

__all__ = ["Outcome", "OutcomeBatch", "Pending", "commit", "commit_many"]

log = logging.getLogger("mssgw.outcomes")

_PENDING = (RecipientState.QUEUED, RecipientState.DEFERRED)


@dataclass(frozen=True)
class Outcome:
    address: str
    state: RecipientState
    reply: str | None = None
    protection: str | None = None
    count_attempt: bool = True


@dataclass
class OutcomeBatch:
    """What one run of a pipeline has decided about one message, not yet written."""

    outcomes: list[Outcome] = field(default_factory=list)
    events: list[AuditEvent] = field(default_factory=list)
    security: dict[str, Any] | None = None

    def add(self, outcome: Outcome, events: list[AuditEvent] | tuple[AuditEvent, ...] = ()) -> None:
        self.outcomes.append(outcome)
        self.events.extend(events)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.events or self.security is not None)


def commit(factory: sessionmaker[Session], queue_id: str, worker: str | None, batch: OutcomeBatch, *,
           schedule: Callable[[int], _dt.datetime] | None = None) -> bool:  # fmt: skip
    """Write ``batch`` and, when ``worker`` still holds the claim, release it; one transaction.

    ``worker=None`` writes the batch and leaves the claim alone.  Returns whether the message is
    done (every recipient final).
    """
    return commit_many(factory, [Pending(queue_id, worker, batch, schedule)])[0]


@dataclass(frozen=True)
class Pending:
    queue_id: str
    worker: str | None
    batch: OutcomeBatch
    schedule: Callable[[int], _dt.datetime] | None = None


def commit_many(factory: sessionmaker[Session], items: Sequence[Pending]) -> list[bool]:
    """``commit`` for several messages in one transaction (group commit: one fsync, one lock)."""
    with factory() as session, session.begin():
        ids = list(dict.fromkeys(p.queue_id for p in items))
        found = {m.id: m for m in session.scalars(
            select(QueuedMessage).options(selectinload(QueuedMessage.recipients)).where(QueuedMessage.id.in_(ids))
        )}  # fmt: skip
        return [_apply(session, found.get(p.queue_id), p) for p in items]


def _apply(session: Session, msg: QueuedMessage | None, item: Pending) -> bool:
    batch = item.batch
    if msg is None:
        log.warning("outcomes for %s dropped: no such message", item.queue_id)
        return True
    rows = {r.address: r for r in msg.recipients}
    for out in batch.outcomes:
        row = rows.get(out.address)
        if row is None:
            log.warning("no recipient %s on message %s: outcome skipped", out.address, item.queue_id)
            continue
        row.state = out.state
        if out.count_attempt:
            row.attempts = (row.attempts or 0) + 1
        if out.reply is not None:
            row.last_reply = out.reply[:2000]
        if out.protection is not None:
            row.protection = out.protection
    if batch.security is not None:
        msg.security = json.dumps(batch.security, sort_keys=True, default=str)
    append(session, batch.events)
    msg.done = all(r.state.final for r in msg.recipients)
    if item.worker is not None and msg.claimed_by == item.worker:
        msg.claimed_by = None
        msg.lease_until = None
        pending = [r for r in msg.recipients if r.state in _PENDING]
        if pending and item.schedule is not None:
            msg.next_attempt_at = item.schedule(max(r.attempts or 0 for r in pending))
    return bool(msg.done)
