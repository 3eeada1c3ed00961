"""Record everything a worker learnt about one message in one database transaction.

The job: a pipeline run returns its verdict (``gateway.process.verdict.Verdict``: recipient
states, replies, protections, audit events, receipts to queue, the inbound verification result,
the delay warning); ``commit`` writes it and gives the claim back in a single transaction; ``commit_many`` does so for
the messages of several workers at once (group commit: one lock and one fsync for all).  The message's ``done``
flag follows its recipients; the next attempt of what is still pending is asked of
``schedule(attempts)`` (the worker's backoff, capped at the expiry).

Every state change obeys ``gateway.queue.models.TRANSITIONS``: a final state stays final (a late
DEFERRED never overwrites DELIVERED or DELETED); a refused change is logged and skipped.  The
claim generation is the fencing token: the outcomes of a worker whose lease was taken over
(the row's ``claim_gen`` moved on) are discarded, since the new holder redoes the message; the
claim is only cleared when it is still ours.  A crash before the commit loses the outcomes and
the lease expires: the message is redone (at least once; peers drop the duplicate by its
dedupe key, per recipient).

A message whose recipients are all final is marked ``done`` and its spool bytes are removed:
spool files after the commit (the row says done before the bytes go, so removed bytes are
never claimable; a crash in between leaves a file ``QueueStore.sweep_orphans`` removes), bytes
kept in the database in the same transaction (``Spool.drop``).
Quarantined messages with nothing pending are ``parked``: never claimed until released.

Errors: database errors propagate (the worker logs them; the lease then expires and the
message is retried).  An outcome for an address the message does not have is logged and
skipped rather than failing the whole batch.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, update
from sqlalchemy import select as _select
from sqlalchemy.orm import Session, sessionmaker

from directory.db import write_connection
from gateway.audit.trail import AuditEvent, append
from gateway.process.verdict import Outcome, Receipt, Verdict
from gateway.queue.admission import NewMessage, insert_new, new_message
from gateway.queue.models import PENDING, QueuedMessage, QueuedRecipient, RecipientState, may_move
from gateway.queue.spool import Spool

__all__ = ["Outcome", "Pending", "Verdict", "commit", "commit_many", "fold_state"]

log = logging.getLogger("mssgw.outcomes")


def commit(factory: sessionmaker[Session], queue_id: str, worker: str | None, batch: Verdict, *,
           schedule: Callable[[int], _dt.datetime] | None = None, gen: int | None = None,
           spool: Spool | None = None) -> bool:  # fmt: skip
    """Write ``batch`` and, when ``worker`` still holds the claim, release it; one transaction.

    ``worker=None`` writes the batch and leaves the claim alone.  Returns whether the message is
    done (every recipient final).
    """
    return commit_many(factory, [Pending(queue_id, worker, batch, schedule, gen)], spool=spool)[0]


@dataclass(frozen=True)
class Pending:
    queue_id: str
    worker: str | None
    batch: Verdict
    schedule: Callable[[int], _dt.datetime] | None = None
    gen: int | None = None  # the claim generation the worker holds (None: not fenced, e.g. an admin)


def fold_state(message: dict[str, Any], rows: Sequence[dict[str, Any]], now: _dt.datetime) -> dict[str, Any]:
    """The message columns its recipients' states imply: ``done``, ``parked`` and, when done, ``purged_at``."""
    states = [RecipientState(r["state"]) for r in rows]
    done = all(s.final for s in states)
    parked = not done and not any(s in PENDING for s in states)
    out: dict[str, Any] = {"done": done, "parked": parked}
    if done and message.get("purged_at") is None:
        out["purged_at"] = now
    return out


def commit_many(factory: sessionmaker[Session], items: Sequence[Pending], *, spool: Spool | None = None,
                lifetime: _dt.timedelta = _dt.timedelta(days=5)) -> list[bool]:  # fmt: skip
    """``commit`` for several messages in one transaction (group commit: one fsync, one lock).

    Plain Core statements (two reads, two executemany updates, the audit insert): the worker
    commits this for every message it handles, and the ORM's unit of work cost more CPU than
    the rest of the transaction.  The rows read are locked (BEGIN IMMEDIATE on SQLite, FOR
    UPDATE on PostgreSQL), so an admin's concurrent ``queue delete`` is never overwritten.

    The receipts of each verdict (DSNs, MDNs, notices; they expire after ``lifetime``) are
    written to ``spool`` first (files) or carried into the transaction (database), then inserted in the same transaction as the outcomes they
    follow from: either both commit or neither does, so a crash never queues a receipt for a
    verdict that is then redone.  A fenced verdict's receipts are dropped with it.
    """
    now = _dt.datetime.now(_dt.UTC)
    admitted = _admit_receipts(items, spool, now, lifetime)
    kept: list[NewMessage] = []
    try:
        with write_connection(factory) as conn:
            results, purged = _commit_in(conn, items, admitted, kept, now, spool)
    except BaseException:
        _discard(spool, [m for ms in admitted.values() for m in ms])
        raise
    _discard(spool, [m for ms in admitted.values() for m in ms if m not in kept or m.duplicate_of is not None])
    if purged and spool is not None:
        spool.remove(purged)
    return results


def _admit_receipts(items: Sequence[Pending], spool: Spool | None, now: _dt.datetime,
                    lifetime: _dt.timedelta) -> dict[int, list[NewMessage]]:  # fmt: skip
    """Stage each verdict's receipts in the spool (files: before the transaction); their rows, by item."""
    admitted: dict[int, list[NewMessage]] = {}
    for index, item in enumerate(items):
        if not item.batch.receipts:
            continue
        if spool is None:
            raise ValueError("a verdict with receipts needs the spool to store them")
        rows = admitted[index] = []
        try:
            for receipt in item.batch.receipts:
                rows.append(_receipt_rows(spool, receipt, now, lifetime))
        except BaseException:
            _discard(spool, [m for ms in admitted.values() for m in ms])
            raise
    return admitted


def _receipt_rows(spool: Spool, receipt: Receipt, now: _dt.datetime, lifetime: _dt.timedelta) -> NewMessage:
    queue_id = secrets.token_hex(16)
    spool.stage(queue_id, receipt.data)
    return new_message(queue_id, receipt.data, sender=receipt.sender, recipients=[receipt.to], origin="receipt",
                       kind=receipt.kind, related_id=receipt.related_id, dedupe_key=receipt.dedupe_key, now=now,
                       lifetime=lifetime, lease=_dt.timedelta(0), audit_events=receipt.events,
                       carry=spool.in_database)  # fmt: skip


def _discard(spool: Spool | None, rows: Sequence[NewMessage]) -> None:
    """Remove the spool files of receipts whose rows were not stored (fenced, duplicate, failed)."""
    for row in rows:
        if spool is not None and row.message is not None:
            try:
                spool.discard(row.message["id"])
            except OSError:  # left for the orphan sweep
                log.warning("spool file of an unstored receipt could not be removed")


def _commit_in(conn: Connection, items: Sequence[Pending], admitted: dict[int, list[NewMessage]],
               kept: list[NewMessage], now: _dt.datetime,
               spool: Spool | None = None) -> tuple[list[bool], list[str]]:  # fmt: skip
    """The body of ``commit_many``'s transaction: whether each item's message is done, and the
    spool names to purge once it has committed (bytes in the database are dropped here)."""
    ids = list(dict.fromkeys(p.queue_id for p in items))
    lock = conn.dialect.name == "postgresql"
    claims, rows = (_CLAIMS_FOR_UPDATE, _ROWS_FOR_UPDATE) if lock else (_CLAIMS, _ROWS)
    params = {"ids": ids}
    heads: dict[str, dict[str, Any]] = {row["id"]: dict(row) for row in conn.execute(claims, params).mappings()}
    recipients: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(rows, params).mappings():
        recipients.setdefault(row["message_id"], []).append(dict(row))
    changed: dict[int, dict[str, Any]] = {}
    messages: list[dict[str, Any]] = []
    results: list[bool] = []
    events: list[AuditEvent] = []
    for index, item in enumerate(items):
        if item.queue_id not in heads:
            log.warning("outcomes for %s dropped: no such message", item.queue_id)
            results.append(True)
            continue
        before = len(changed)
        done, update_ = _apply(recipients.get(item.queue_id, []), heads[item.queue_id], item, changed, now)
        # Receipts follow from the outcomes: none is stored for a verdict the state table refused
        # whole (e.g. an admin deleted the message meanwhile, or a second commit of one run).
        refused = bool(item.batch.outcomes) and len(changed) == before
        if item.gen is not None and heads[item.queue_id]["claim_gen"] != item.gen:
            events.append(AuditEvent("outcome-fenced", "info", actor=item.worker or "", queue_id=item.queue_id,
                                     detail={"claim_gen": item.gen}))  # fmt: skip
        else:
            events.extend(item.batch.events)
            if not refused:
                kept.extend(admitted.get(index, ()))
        heads[item.queue_id] = {**heads[item.queue_id], **update_}
        messages.append(update_)
        results.append(done)
    if changed:
        conn.execute(_RECIPIENT_UPDATE, [{**row, "updated_at": now} for row in changed.values()])
    for keys, group in _by_keys(messages).items():
        conn.execute(_message_update(keys), group)
    if kept:
        insert_new(conn, kept, spool)  # the receipts, kept once per (dedupe key, recipient)
    append(conn, events)
    purged = [h["spool_name"] for h in heads.values() if h.get("purged_at") == now]
    if purged and spool is not None:
        spool.drop(conn, purged)  # a no-op for files: they go after the commit
    return results, purged


_MESSAGES = cast(Table, QueuedMessage.__table__)
_RECIPIENTS = cast(Table, QueuedRecipient.__table__)
_CLAIMS = _select(_MESSAGES.c.id, _MESSAGES.c.claimed_by, _MESSAGES.c.claim_gen, _MESSAGES.c.spool_name,
                  _MESSAGES.c.purged_at).where(_MESSAGES.c.id.in_(bindparam("ids", expanding=True)))
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


def _apply(rows: list[dict[str, Any]], head: dict[str, Any], item: Pending,
           changed: dict[int, dict[str, Any]], now: _dt.datetime) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """Fold ``item``'s outcomes into its recipient ``rows``; returns (done, the message's new columns)."""
    batch = item.batch
    claimed_by = head["claimed_by"]
    fenced = item.gen is not None and head.get("claim_gen") != item.gen
    if fenced:  # our lease was taken over: the new holder redoes the message, our verdict is void
        log.warning("outcomes for %s discarded: claim generation %s, now %s", item.queue_id, item.gen,
                    head.get("claim_gen"))
    by_address = {r["address"]: r for r in rows}
    for out in () if fenced else batch.outcomes:
        row = by_address.get(out.address)
        if row is None:
            log.warning("no recipient %s on message %s: outcome skipped", out.address, item.queue_id)
            continue
        if not may_move(row["state"], out.state):
            log.warning("recipient of %s stays %s: %s refused by the state table", item.queue_id,
                        RecipientState(row["state"]).value, out.state.value)
            continue
        row["state"] = out.state
        if out.count_attempt:
            row["attempts"] = (row["attempts"] or 0) + 1
        if out.reply is not None:
            row["last_reply"] = out.reply[:2000]
        if out.protection is not None:
            row["protection"] = out.protection[:32]
        changed[row["id"]] = {"rid": row["id"], "new_state": RecipientState(row["state"]),
                              "new_attempts": row["attempts"], "new_reply": row["last_reply"],
                              "new_protection": row["protection"]}  # fmt: skip
    update_: dict[str, Any] = {"mid": item.queue_id, **fold_state(head, rows, now)}
    done = bool(update_["done"])
    if batch.security is not None and not fenced:
        update_["security"] = json.dumps(batch.security, sort_keys=True, default=str)
    if batch.warned_at is not None and not fenced:
        update_["warned_at"] = batch.warned_at
    if item.worker is not None and claimed_by == item.worker and not fenced:
        update_.update(claimed_by=None, lease_until=None)
        pending = [r for r in rows if RecipientState(r["state"]) in PENDING]
        if pending and item.schedule is not None:
            update_["next_attempt_at"] = item.schedule(max(r["attempts"] or 0 for r in pending))
    return done, update_
