"""The one door into the queue for the edges: ``Intake.accept(Arrival) -> Enqueued``, durable when it returns.

The job: an edge (the SMTP listeners; the HTTP API) says what it accepted — the bytes, the
envelope and its own audit records — and gets back the queue id once bytes and rows are
committed (ARCHITECTURE rule 2: the 250 or the 202 comes only then).  Everything else about
entering the queue is decided here, not in the edges:

- the write runs in the enqueue threads (``writer``), where the store groups concurrent
  acceptances into one transaction (``gateway.queue.admission.GroupCommit``);
- audit records still waiting in the audit writer ride in the same transaction (one write
  instead of two) and are given back if it does not commit;
- when this process's workers have a free slot, the message is stored already leased to them
  and handed over from memory (no claim transaction, no spool read); otherwise ``on_queued``
  wakes whoever claims from the queue.

Errors: ``QueueError`` (from the store) when the message could not be stored; its ``__cause__``
says why (``OSError`` with ENOSPC for a full disk).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.audit.trail import AuditEvent
from gateway.queue.store import Enqueued, QueueStore

__all__ = ["Arrival", "AuditRiders", "Handoff", "Intake"]


@dataclass(frozen=True)
class Arrival:
    """What an edge accepted and asks the queue to keep."""

    data: bytes
    sender: str  # "" for the null reverse-path
    recipients: Sequence[str]
    origin: str  # submission, inbound, api
    queue_id: str | None = None  # chosen by the edge when its trace header names it
    client_address: str | None = None
    auth_identity: str | None = None
    peer_operator: str | None = None
    message_id: str | None = None
    dedupe_key: str | None = None
    #: The protection decided per recipient at RCPT time (carried with the job to every attempt).
    protections: Mapping[str, str] = field(default_factory=dict)
    events: Sequence[AuditEvent] = ()
    #: The DSN parameters the sender gave (RFC 3461): ENVID and RET for the message (decoded),
    #: NOTIFY and ORCPT per recipient; absent ones mean the default (failure and delay DSNs).
    dsn_envid: str | None = None
    dsn_ret: str | None = None
    dsn_notify: Mapping[str, str] = field(default_factory=dict)
    dsn_orcpt: Mapping[str, str] = field(default_factory=dict)


class Handoff(Protocol):
    """The queue workers of this process, as the intake sees them (``gateway.queue.worker.Workers``)."""

    def reserve(self) -> str | None:
        """A worker id to store the next message leased to, or None (then it is claimed as usual)."""

    def cancel(self) -> None:
        """The reserved message was not stored: the slot goes back."""

    def take(self, row: dict[str, Any], data: bytes) -> None:
        """Process the message just stored with ``claimed_by=reserve()``, from memory."""


class AuditRiders(Protocol):
    """The audit writer, as the intake sees it (``gateway.audit.trail.AuditWriter``)."""

    def take_pending(self) -> list[AuditEvent]: ...

    def submit(self, *events: AuditEvent) -> None: ...


class Intake:
    def __init__(self, store: QueueStore, *, writer: Executor | None = None, audit: AuditRiders | None = None,
                 handoff: Callable[[], Handoff | None] | None = None,
                 on_queued: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.store = store
        self.writer = writer
        self.audit = audit
        self.handoff = handoff
        self.on_queued = on_queued

    async def accept(self, arrival: Arrival) -> Enqueued:
        """Store ``arrival`` durably; returns once committed (``Enqueued.duplicate``: every
        recipient had already been accepted under its dedupe key, nothing new was stored)."""
        workers = self.handoff() if self.handoff is not None else None
        owner = workers.reserve() if workers is not None else None
        riders = self.audit.take_pending() if self.audit is not None else []
        job = functools.partial(
            self.store.enqueue, arrival.data, sender=arrival.sender, recipients=list(arrival.recipients),
            origin=arrival.origin, client_address=arrival.client_address, auth_identity=arrival.auth_identity,
            peer_operator=arrival.peer_operator, message_id=arrival.message_id, dedupe_key=arrival.dedupe_key,
            queue_id=arrival.queue_id, protections=dict(arrival.protections), audit_events=arrival.events,
            riders=riders, claimed_by=owner, dsn_envid=arrival.dsn_envid, dsn_ret=arrival.dsn_ret,
            dsn_notify=dict(arrival.dsn_notify), dsn_orcpt=dict(arrival.dsn_orcpt),
        )  # fmt: skip
        stored = asyncio.get_running_loop().run_in_executor(self.writer, job)
        settle = functools.partial(self._settle, workers, owner, riders, arrival.data)
        try:
            # Shielded: when the wait is cancelled (the client hung up before its 250, the
            # gateway stops) the write still finishes in its thread.  What it stored is then
            # handed over (or its slot given back) when it does, never left leased to a worker
            # that was not told: that message would wait for its lease to run out.
            result = await asyncio.shield(stored)
        except asyncio.CancelledError:
            stored.add_done_callback(lambda done: settle(None if done.cancelled() or done.exception() else done.result()))
            raise
        except BaseException:
            settle(None)
            raise
        settle(result)
        return result

    def _settle(self, workers: Handoff | None, owner: str | None, riders: list[AuditEvent], data: bytes,
                result: Enqueued | None) -> None:  # fmt: skip
        """After the write: the audit records that did not ride go back to the audit writer; the
        reserved slot is used (the message, from memory) or given back; a message stored for
        no slot wakes whoever claims."""
        if riders and self.audit is not None and (result is None or result.duplicate):
            self.audit.submit(*riders)
        stored = result is not None and not result.duplicate
        if workers is not None and owner is not None:
            if stored and result is not None and result.row is not None:
                workers.take(result.row, data)  # processed from memory, no claim needed
            else:  # not stored or a duplicate: the slot goes back
                workers.cancel()
        elif stored and result is not None and self.on_queued is not None:
            self.on_queued(result.queue_id)
