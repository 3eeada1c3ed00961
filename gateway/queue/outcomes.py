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
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, update
from sqlalchemy import select as _select
from sqlalchemy.orm import Session, sessionmaker

from directory.db import write_connection
from gateway.audit.trail import AuditEvent, append
from gateway.queue.models import QueuedMessage, QueuedRecipient, RecipientState

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
    """``commit`` for several messages in one transaction (group commit: one fsync, one lock).

    Plain Core statements (two reads, two executemany updates, the audit insert): the worker
    commits this for every message it handles, and the ORM's unit of work cost more CPU than
    the rest of the transaction.  The rows read are locked (BEGIN IMMEDIATE on SQLite, FOR
    UPDATE on PostgreSQL), so an admin's concurrent ``queue delete`` is never overwritten.
    """
    now = _dt.datetime.now(_dt.UTC)
    with write_connection(factory) as conn:
        ids = list(dict.fromkeys(p.queue_id for p in items))
        lock = conn.dialect.name == "postgresql"
        claims, rows = (_CLAIMS_FOR_UPDATE, _ROWS_FOR_UPDATE) if lock else (_CLAIMS, _ROWS)
        params = {"ids": ids}
        claimed_by: dict[str, str | None] = {row[0]: row[1] for row in conn.execute(claims, params)}
        recipients: dict[str, list[dict[str, Any]]] = {}
        for row in conn.execute(rows, params).mappings():
            recipients.setdefault(row["message_id"], []).append(dict(row))
        changed: dict[int, dict[str, Any]] = {}
        messages: list[dict[str, Any]] = []
        results: list[bool] = []
        events: list[AuditEvent] = []
        for item in items:
            if item.queue_id not in claimed_by:
                log.warning("outcomes for %s dropped: no such message", item.queue_id)
                results.append(True)
                continue
            done, update = _apply(recipients.get(item.queue_id, []), claimed_by[item.queue_id], item, changed)
            claimed_by[item.queue_id] = update.get("claimed_by", claimed_by[item.queue_id])
            messages.append(update)
            events.extend(item.batch.events)
            results.append(done)
        if changed:
            conn.execute(_RECIPIENT_UPDATE, [{**row, "updated_at": now} for row in changed.values()])
        for keys, group in _by_keys(messages).items():
            conn.execute(_message_update(keys), group)
        append(conn, events)
        return results


_MESSAGES = cast(Table, QueuedMessage.__table__)
_RECIPIENTS = cast(Table, QueuedRecipient.__table__)
_CLAIMS = _select(_MESSAGES.c.id, _MESSAGES.c.claimed_by).where(_MESSAGES.c.id.in_(bindparam("ids", expanding=True)))
_ROWS = (
    _select(_RECIPIENTS.c.id, _RECIPIENTS.c.message_id, _RECIPIENTS.c.address, _RECIPIENTS.c.state,
            _RECIPIENTS.c.attempts, _RECIPIENTS.c.last_reply, _RECIPIENTS.c.protection)
    .where(_RECIPIENTS.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(_RECIPIENTS.c.id)
)  # fmt: skip
_CLAIMS_FOR_UPDATE, _ROWS_FOR_UPDATE = _CLAIMS.with_for_update(), _ROWS.with_for_update()
_RECIPIENT_UPDATE = (
    update(_RECIPIENTS)
    .where(_RECIPIENTS.c.id == bindparam("rid"))
    .values(state=bindparam("new_state", type_=_RECIPIENTS.c.state.type),
            attempts=bindparam("new_attempts", type_=_RECIPIENTS.c.attempts.type),
            last_reply=bindparam("new_reply", type_=_RECIPIENTS.c.last_reply.type),
            protection=bindparam("new_protection", type_=_RECIPIENTS.c.protection.type),
            updated_at=bindparam("updated_at", type_=_RECIPIENTS.c.updated_at.type))
)  # fmt: skip


@functools.cache
def _message_update(keys: tuple[str, ...]) -> Any:
    """The UPDATE setting ``keys`` (a handful of combinations: built once each)."""
    return update(_MESSAGES).where(_MESSAGES.c.id == bindparam("mid")).values(
        {key: bindparam(f"new_{key}", type_=_MESSAGES.c[key].type) for key in keys}
    )


def _by_keys(messages: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """executemany needs one statement per set of columns: group the updates by the columns they set."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for update_ in messages:
        keys = tuple(sorted(k for k in update_ if k != "mid"))
        groups.setdefault(keys, []).append({"mid": update_["mid"], **{f"new_{k}": update_[k] for k in keys}})
    return groups


def _apply(rows: list[dict[str, Any]], claimed_by: str | None, item: Pending,
           changed: dict[int, dict[str, Any]]) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """Fold ``item``'s outcomes into its recipient ``rows``; returns (done, the message's new columns)."""
    batch = item.batch
    by_address = {r["address"]: r for r in rows}
    for out in batch.outcomes:
        row = by_address.get(out.address)
        if row is None:
            log.warning("no recipient %s on message %s: outcome skipped", out.address, item.queue_id)
            continue
        row["state"] = out.state
        if out.count_attempt:
            row["attempts"] = (row["attempts"] or 0) + 1
        if out.reply is not None:
            row["last_reply"] = out.reply[:2000]
        if out.protection is not None:
            row["protection"] = out.protection
        changed[row["id"]] = {"rid": row["id"], "new_state": RecipientState(row["state"]),
                              "new_attempts": row["attempts"], "new_reply": row["last_reply"],
                              "new_protection": row["protection"]}  # fmt: skip
    done = all(RecipientState(r["state"]).final for r in rows)
    update_: dict[str, Any] = {"mid": item.queue_id, "done": done}
    if batch.security is not None:
        update_["security"] = json.dumps(batch.security, sort_keys=True, default=str)
    if item.worker is not None and claimed_by == item.worker:
        update_.update(claimed_by=None, lease_until=None)
        pending = [r for r in rows if RecipientState(r["state"]) in _PENDING]
        if pending and item.schedule is not None:
            update_["next_attempt_at"] = item.schedule(max(r["attempts"] or 0 for r in pending))
    return done, update_
