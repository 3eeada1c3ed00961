"""The durable queue: message bytes in a spool (``gateway.queue.spool``), envelope and state in the database.

``enqueue`` is the only writer of new messages. On SQLite it writes the bytes to a
temporary file, fsyncs it, renames it into place and fsyncs the folder (in the
caller's thread, so several messages do this at once), then commits the envelope
rows and the acceptance's audit records; on PostgreSQL the bytes are a row of the
same transaction, so any node that shares the database can deliver the message. Commits are grouped: one caller at a
time writes to the database and takes, in ONE transaction, every message (and
audit batch, ``append_audit``) queued while the previous commit ran; the others
wait for that commit. No timer: a lone message commits at once. If a grouped
transaction fails, its members are committed again one by one, so each caller
gets its own result or its own error. ``enqueue`` returns only after the commit
that includes its message, so the SMTP layer answers 250 only then and an
acknowledged message survives kill -9. A crash between the file and the commit
leaves an orphan file, never a row without bytes; ``sweep_orphans`` removes them.

Claims (``claim``) take ready messages with a lease: ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL so several nodes share one queue; on SQLite the write lock serialises
claimers. A lease held by a dead worker expires and the message is claimed again.
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Integer, Table, bindparam, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from directory.db import write_connection
from gateway.audit.trail import AuditEvent, append
from gateway.process.verdict import as_utc
from gateway.queue.admission import GroupCommit, NewMessage, QueueError, new_message
from gateway.queue.models import RELEASED, QueuedMessage, QueuedRecipient, RecipientState, may_move
from gateway.queue.outcomes import fold_state
from gateway.queue.spool import FileSpool, Spool, spool_for

__all__ = ["Enqueued", "QueueError", "QueueStore", "as_utc", "message_dict", "new_queue_id", "now_utc"]

log = logging.getLogger("mssgw.queue")


@dataclass(frozen=True)
class Enqueued:
    queue_id: str
    duplicate: bool = False  # the dedupe key was already queued: nothing new was stored
    #: The columns stored, with ``recipients``, as ``claim_rows`` returns them (a new message only).
    row: dict[str, Any] | None = field(default=None, compare=False, repr=False)


def new_queue_id() -> str:
    """A fresh queue id: 32 random hex digits (also the spool file name)."""
    return secrets.token_hex(16)


def now_utc() -> datetime:
    return datetime.now(UTC)


_MESSAGES = cast(Table, QueuedMessage.__table__)
_RECIPIENTS = cast(Table, QueuedRecipient.__table__)


#: Ready messages: not done, not parked (quarantine), due, and not leased (or the lease ran
#: out), oldest due first.  A purged message is done (same transaction), so never ready.
_READY = (
    select(_MESSAGES.c.id)
    .where(
        _MESSAGES.c.done.is_(False),
        _MESSAGES.c.parked.is_(False),
        _MESSAGES.c.next_attempt_at <= bindparam("now", type_=_MESSAGES.c.next_attempt_at.type),
        or_(_MESSAGES.c.lease_until.is_(None),
            _MESSAGES.c.lease_until < bindparam("now", type_=_MESSAGES.c.lease_until.type)),
    )
    .order_by(_MESSAGES.c.next_attempt_at)
    .limit(bindparam("limit", type_=Integer))
)  # fmt: skip
_READY_FOR_UPDATE = _READY.with_for_update(skip_locked=True)  # PostgreSQL: nodes share the queue
_LEASE = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id.in_(bindparam("ids", expanding=True)))
    .values(claimed_by=bindparam("worker", type_=_MESSAGES.c.claimed_by.type),
            lease_until=bindparam("lease_until", type_=_MESSAGES.c.lease_until.type),
            claim_gen=_MESSAGES.c.claim_gen + 1)
    .returning(*_MESSAGES.c)
)  # fmt: skip
_RECIPIENTS_OF = (
    select(_RECIPIENTS).where(_RECIPIENTS.c.message_id.in_(bindparam("ids", expanding=True))).order_by(_RECIPIENTS.c.id)
)


class QueueStore:
    def __init__(self, factory: sessionmaker[Session], spool_dir: Path, *, lifetime: timedelta = timedelta(days=5),
                 lease: timedelta = timedelta(minutes=5), spool: Spool | None = None) -> None:
        self._factory = factory
        self.spool_dir = spool_dir
        # Plaintext of messages waiting: files 0600 in 0700 folders unless ``spool`` says otherwise;
        # the gateway and the CLI pass ``spool_for`` (rows of the database on PostgreSQL).
        self.spool: Spool = spool if spool is not None else FileSpool(spool_dir)
        self.group = GroupCommit(lambda: self._factory, self.spool)
        self.lifetime = lifetime
        self.lease = lease

    @classmethod
    def for_database(cls, factory: sessionmaker[Session], spool_dir: Path, *, lifetime: timedelta = timedelta(days=5),
                     lease: timedelta = timedelta(minutes=5)) -> QueueStore:  # fmt: skip
        """The store with the spool the database implies (``spool_for``): what ``mssgw serve`` and
        the CLI open, so that every node sharing a PostgreSQL reads the same bytes."""
        return cls(factory, spool_dir, lifetime=lifetime, lease=lease, spool=spool_for(factory, spool_dir))

    # --- writing ---------------------------------------------------------------------

    def spool_path(self, spool_name: str) -> Path:
        """The file of ``spool_name`` (spool files only: a database spool has no path)."""
        if not isinstance(self.spool, FileSpool):
            raise QueueError("the spool is in the database: its bytes have no file")
        return self.spool.path(spool_name)

    def enqueue(
        self,
        data: bytes,
        *,
        sender: str,
        recipients: Sequence[str],
        origin: str,
        auth_identity: str | None = None,
        client_address: str | None = None,
        peer_operator: str | None = None,
        message_id: str | None = None,
        dedupe_key: str | None = None,
        related_id: str | None = None,
        kind: str = "message",
        security: dict[str, Any] | None = None,
        protections: dict[str, str] | None = None,
        audit_events: Sequence[AuditEvent] = (),
        queue_id: str | None = None,
        claimed_by: str | None = None,
        riders: Sequence[AuditEvent] = (),
        dsn_envid: str | None = None,
        dsn_ret: str | None = None,
        dsn_notify: dict[str, str] | None = None,
        dsn_orcpt: dict[str, str] | None = None,
    ) -> Enqueued:
        """Store the message durably; returns only once bytes and rows are committed.

        ``queue_id`` may be chosen by the caller (``new_queue_id()``) so that a trace
        header written into the bytes can name it; by default a new one is drawn.
        ``claimed_by`` stores the message already leased to that worker (a hand-off: the
        worker of this process takes it from memory, without a claim transaction); if
        that worker dies, the lease expires and any worker claims it as usual.
        ``riders`` are audit records of earlier decisions committed in the same transaction as
        they are (``audit_events`` are this message's and get its queue id).  ``dsn_*``: the
        sender's DSN parameters (RFC 3461), kept with the message and its recipients.
        """
        if not recipients:
            raise QueueError("a message needs at least one recipient")
        queue_id = queue_id or new_queue_id()
        try:
            self.spool.stage(queue_id, data)
        except OSError as exc:
            raise QueueError(f"cannot write the spool file ({exc.strerror or exc})") from exc
        item = new_message(
            queue_id, data, sender=sender, recipients=recipients, origin=origin, now=now_utc(),
            lifetime=self.lifetime, lease=self.lease, kind=kind, auth_identity=auth_identity,
            client_address=client_address, peer_operator=peer_operator, message_id=message_id,
            dedupe_key=dedupe_key, related_id=related_id, security=security, protections=protections,
            audit_events=audit_events, claimed_by=claimed_by, riders=riders, carry=self.spool.in_database,
            dsn_envid=dsn_envid, dsn_ret=dsn_ret, dsn_notify=dsn_notify, dsn_orcpt=dsn_orcpt,
        )  # fmt: skip
        self.group.run(item)
        if isinstance(item.error, IntegrityError) and dedupe_key is not None:
            # Another node accepted a copy for some of these recipients meanwhile: decide again
            # against what it committed (the transaction re-reads the dedupe rows).
            item.done, item.error = False, None
            self.group.run(item)
        error = item.error
        if isinstance(error, IntegrityError):
            self.spool.discard(queue_id)
            raise QueueError("the queue refused the message (conflict); try again") from None
        if error is not None:
            self.spool.discard(queue_id)
            raise QueueError(f"the queue database cannot store the message ({type(error).__name__})") from error
        if item.duplicate_of is not None:  # every recipient already accepted: stored nowhere
            self.spool.discard(queue_id)
            return Enqueued(item.duplicate_of, duplicate=True)
        assert item.message is not None
        return Enqueued(queue_id, row={**item.message, "recipients": item.recipients})

    def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Commit audit records with the next group of messages (one write transaction for both)."""
        if not events:
            return
        item = NewMessage(events=list(events))
        self.group.run(item)
        if item.error is not None:
            raise item.error

    def read(self, queue_id: str) -> bytes:
        with self._factory() as session:
            msg = session.get(QueuedMessage, queue_id)
            if msg is None:
                raise QueueError(f"no message {queue_id} in the queue")
            if msg.purged_at is not None:
                raise QueueError(f"the bytes of {queue_id} were removed when it was finished "
                                 f"({as_utc(msg.purged_at).isoformat(timespec='seconds')})")  # fmt: skip
            name = msg.spool_name
        try:
            return self.spool.read(name)
        except OSError as exc:
            raise QueueError(f"spool bytes of {queue_id} cannot be read ({exc.strerror})") from exc

    def sweep_orphans(self, older_than: float = 3600.0) -> int:
        """Remove spool bytes with no queue row (a crash before commit; never acknowledged) or
        whose message is finished (a crash between the final commit and ``purge_spool``)."""
        return self.spool.sweep(self._factory, older_than)

    # --- claiming and outcomes --------------------------------------------------------------

    def claim(self, worker: str, *, limit: int = 10, now: datetime | None = None) -> list[str]:
        """Lease up to ``limit`` ready messages to ``worker``; returns their queue ids."""
        return [row["id"] for row in self.claim_rows(worker, limit=limit, now=now)]

    def claim_with_bytes(self, worker: str, *, limit: int = 10,
                         now: datetime | None = None) -> list[tuple[dict[str, Any], bytes | QueueError]]:  # fmt: skip
        """``claim_rows`` with each message's bytes (or why they cannot be read): read in the claim's
        transaction when the spool is in the database, from the files after it otherwise."""
        found: dict[str, bytes] = {}
        rows = self.claim_rows(worker, limit=limit, now=now, read_into=found)
        out: list[tuple[dict[str, Any], bytes | QueueError]] = []
        for row in rows:
            name = row["spool_name"]
            data: bytes | QueueError
            if self.spool.in_database:
                data = found[name] if name in found else QueueError(f"spool bytes of {row['id']} are missing")
            else:
                try:
                    data = self.spool.read(name)
                except OSError as exc:
                    data = QueueError(f"spool file of {row['id']} cannot be read ({exc.strerror})")
            out.append((row, data))
        return out

    def claim_rows(self, worker: str, *, limit: int = 10, now: datetime | None = None,
                   read_into: dict[str, bytes] | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """``claim``, returning each claimed message's columns with its ``recipients`` (lists of dicts).

        The worker needs the rows anyway: reading them in the claim's transaction saves a
        query and a thread hop per message.  ``read_into`` receives the bytes of the claimed
        messages when the spool is in the database.  Three prebuilt statements (the ready ids, the
        lease with ``UPDATE ... RETURNING`` the rows, their recipients): claims run for every
        few messages, and building statements cost more CPU than running them.
        """
        now = now or now_utc()
        with write_connection(self._factory) as conn:
            ready = _READY_FOR_UPDATE if conn.dialect.name == "postgresql" else _READY
            ids = list(conn.scalars(ready, {"now": now, "limit": limit}))
            if not ids:
                return []
            rows = {row["id"]: {**row, "recipients": []}
                    for row in conn.execute(_LEASE, {"ids": ids, "worker": worker,
                                                     "lease_until": now + self.lease}).mappings()}  # fmt: skip
            for row in conn.execute(_RECIPIENTS_OF, {"ids": ids}).mappings():
                rows[row["message_id"]]["recipients"].append(dict(row))
            if read_into is not None and self.spool.in_database:  # the bytes, for the node that claims
                read_into.update(self.spool.read_many(conn, [r["spool_name"] for r in rows.values()]))
        return [rows[i] for i in ids if i in rows]

    def renew(self, queue_id: str, worker: str, claim_gen: int, now: datetime | None = None) -> bool:
        """Extend ``worker``'s lease on ``queue_id`` if it still holds claim ``claim_gen``; whether it does."""
        now = now or now_utc()
        with write_connection(self._factory) as conn:
            result = conn.execute(
                update(_MESSAGES)
                .where(_MESSAGES.c.id == queue_id, _MESSAGES.c.claimed_by == worker, _MESSAGES.c.claim_gen == claim_gen)
                .values(lease_until=now + self.lease)
            )  # fmt: skip
            return bool(result.rowcount)

    def release(self, queue_id: str, worker: str, *, next_attempt_at: datetime | None = None) -> None:
        """Give a claim back, done or to be retried at ``next_attempt_at``."""
        with self._factory() as session, session.begin():
            msg = session.get(QueuedMessage, queue_id)
            if msg is None or msg.claimed_by != worker:
                return
            msg.claimed_by = None
            msg.lease_until = None
            purged = self._fold(msg)
            if next_attempt_at is not None:
                msg.next_attempt_at = next_attempt_at
        self.purge_spool(purged)

    def set_recipient_state(
        self,
        queue_id: str,
        address: str,
        state: RecipientState,
        *,
        reply: str | None = None,
        protection: str | None = None,
        audit_events: Sequence[AuditEvent] = (),
        count_attempt: bool = True,
    ) -> None:
        with self._factory() as session, session.begin():
            row = session.scalar(
                select(QueuedRecipient).where(QueuedRecipient.message_id == queue_id, QueuedRecipient.address == address)
            )
            if row is None:
                raise QueueError(f"no recipient {address} on message {queue_id}")
            if not may_move(row.state, state):
                raise QueueError(f"recipient {address} of {queue_id} is {row.state.value}: it cannot become "
                                 f"{RecipientState(state).value}")  # fmt: skip
            row.state = state
            if count_attempt:
                row.attempts += 1
            if reply is not None:
                row.last_reply = reply[:2000]
            if protection is not None:
                row.protection = protection
            append(session, list(audit_events))
            session.flush()
            purged = self._fold(row.message)
        self.purge_spool(purged)

    def _fold(self, msg: QueuedMessage) -> list[str]:
        """Set ``done``/``parked``/``purged_at`` from the recipients; the spool names to remove after
        commit (bytes kept in the database are dropped here, in the caller's transaction)."""
        cols = fold_state({"purged_at": msg.purged_at}, [{"state": r.state} for r in msg.recipients], now_utc())
        msg.done, msg.parked = cols["done"], cols["parked"]
        if "purged_at" in cols:
            msg.purged_at = cols["purged_at"]
            session = Session.object_session(msg)
            if session is not None and self.spool.in_database:
                self.spool.drop(session.connection(), [msg.spool_name])
            return [msg.spool_name]
        return []

    def purge_spool(self, spool_names: Sequence[str]) -> None:
        """Remove the bytes of finished messages, after the commit that made them final."""
        self.spool.remove(spool_names)

    # --- admin -------------------------------------------------------------------------------

    def get(self, queue_id: str) -> dict[str, Any]:
        with self._factory() as session:
            msg = session.scalar(
                select(QueuedMessage).options(selectinload(QueuedMessage.recipients)).where(QueuedMessage.id == queue_id)
            )
            if msg is None:
                raise QueueError(f"no message {queue_id} in the queue")
            receipts = list(
                session.scalars(select(QueuedMessage).where(QueuedMessage.related_id == queue_id))
            )
            return message_dict(msg, detail=True, receipts=receipts)

    def list(self, *, state: str | None = None, limit: int = 200, include_done: bool = False) -> list[dict[str, Any]]:
        with self._factory() as session:
            stmt = (
                select(QueuedMessage)
                .options(selectinload(QueuedMessage.recipients))
                .order_by(QueuedMessage.created_at)
                .limit(limit)
            )
            if not include_done and state is None:
                stmt = stmt.where(QueuedMessage.done.is_(False))
            if state is not None:
                stmt = stmt.where(
                    QueuedMessage.recipients.any(QueuedRecipient.state == RecipientState(state))
                )
            return [message_dict(m) for m in session.scalars(stmt)]

    def retry(self, queue_id: str, *, now: datetime | None = None, force: bool = False) -> int:
        """Make deferred (or quarantined-then-released) recipients due now; returns how many.

        A message that a worker is attempting right now keeps that worker's lease: breaking it
        would let a second worker (another node, or the next poll) claim the message and relay
        it while the first is still relaying it, and the peer would get it twice.  It is due as
        soon as the attempt under way ends (the holder's outcome then sets the next attempt), or
        when the lease runs out if the holder died (``claimed_by`` and ``lease_until`` in ``get``).
        ``force`` takes the lease back anyway: for an admin who knows the holder's process is dead
        (a node killed and restarted), so that its message need not wait for the lease."""
        now = now or now_utc()
        with self._factory() as session, session.begin():
            msg = session.get(QueuedMessage, queue_id)
            if msg is None:
                raise QueueError(f"no message {queue_id} in the queue")
            due = [r for r in msg.recipients if r.state in (RecipientState.DEFERRED, RecipientState.QUEUED)]
            if not due:
                raise QueueError(f"message {queue_id} has no recipient waiting for delivery")
            msg.next_attempt_at = now
            _free_unless_held(msg, now, force=force)
            append(session, [AuditEvent("queue-retry", "info", queue_id=queue_id, actor="admin")])
            return len(due)

    def delete(self, queue_id: str, *, reason: str, actor: str = "admin") -> int:
        if not reason.strip():
            raise QueueError("deleting a message needs a reason (--reason)")
        with self._factory() as session, session.begin():
            msg = session.get(QueuedMessage, queue_id)
            if msg is None:
                raise QueueError(f"no message {queue_id} in the queue")
            touched = 0
            for r in msg.recipients:
                if may_move(r.state, RecipientState.DELETED):
                    r.state = RecipientState.DELETED
                    r.last_reply = f"deleted by {actor}: {reason}"[:2000]
                    touched += 1
            purged = self._fold(msg)
            append(session, [AuditEvent("queue-delete", "info", queue_id=queue_id, actor=actor,
                                        detail={"reason": reason, "recipients": touched})])
        self.purge_spool(purged)
        return touched

    def quarantined(self, limit: int = 200) -> builtins.list[dict[str, Any]]:
        return self.list(state=RecipientState.QUARANTINED.value, limit=limit)

    def quarantined_count(self) -> int:
        """How many messages have a recipient held in quarantine now (the ``/metrics`` gauge)."""
        with self._factory() as session:
            stmt = select(func.count(func.distinct(QueuedRecipient.message_id))).where(
                QueuedRecipient.state == RecipientState.QUARANTINED)
            return int(session.scalar(stmt) or 0)

    def release_quarantine(self, queue_id: str, *, actor: str = "admin") -> int:
        """An admin vouches for a quarantined message: its recipients are delivered as is."""
        with self._factory() as session, session.begin():
            msg = session.get(QueuedMessage, queue_id)
            if msg is None:
                raise QueueError(f"no message {queue_id} in the queue")
            released = 0
            for r in msg.recipients:
                if r.state == RecipientState.QUARANTINED and may_move(r.state, RecipientState.QUEUED):
                    r.state = RecipientState.QUEUED
                    r.protection = RELEASED
                    r.last_reply = f"released from quarantine by {actor}"[:2000]
                    released += 1
            if not released:
                raise QueueError(f"message {queue_id} is not in quarantine")
            self._fold(msg)
            now = now_utc()
            msg.next_attempt_at = now
            _free_unless_held(msg, now)  # a worker delivering its other recipients keeps its lease
            append(session, [AuditEvent("quarantine-release", "info", queue_id=queue_id, actor=actor,
                                        detail={"recipients": released})])  # fmt: skip
            return released


def _free_unless_held(msg: QueuedMessage, now: datetime, *, force: bool = False) -> None:
    """Clear ``msg``'s claim unless a worker still holds it at ``now`` (its lease has not run out):
    taken from a live worker, the message could be relayed by two (``QueueStore.retry``).
    ``force``: the admin knows the holder is dead."""
    if force or msg.lease_until is None or as_utc(msg.lease_until) <= now:
        msg.lease_until = None
        msg.claimed_by = None


def message_dict(msg: QueuedMessage, *, detail: bool = False, receipts: Sequence[QueuedMessage] = ()) -> dict[str, Any]:
    states = sorted({r.state.value for r in msg.recipients})
    data: dict[str, Any] = {
        "id": msg.id,
        "created_at": as_utc(msg.created_at).isoformat(timespec="seconds"),
        "origin": msg.origin,
        "kind": msg.kind,
        "sender": msg.sender or "<>",
        "recipients": len(msg.recipients),
        "size": msg.size,
        "state": "done" if msg.done else ",".join(states),
        "bytes": "removed" if msg.purged_at is not None else "kept",
    }
    if detail:
        data.update(
            {
                "message_id": msg.message_id,
                "auth_identity": msg.auth_identity,
                "client_address": msg.client_address,
                "peer_operator": msg.peer_operator,
                "sha256": msg.sha256,
                "expires_at": as_utc(msg.expires_at).isoformat(timespec="seconds"),
                "next_attempt_at": as_utc(msg.next_attempt_at).isoformat(timespec="seconds"),
                "claimed_by": msg.claimed_by,
                "lease_until": as_utc(msg.lease_until).isoformat(timespec="seconds") if msg.lease_until else None,
                "parked": msg.parked,
                "bytes_removed_at": as_utc(msg.purged_at).isoformat(timespec="seconds") if msg.purged_at else None,
                "related_id": msg.related_id,
                "security": json.loads(msg.security) if msg.security else None,
                "recipient_states": [
                    {"address": r.address, "state": r.state.value, "attempts": r.attempts,
                     "protection": r.protection, "last_reply": r.last_reply}
                    for r in msg.recipients
                ],
                "receipts": [{"id": r.id, "kind": r.kind, "created_at": as_utc(r.created_at).isoformat(timespec="seconds")}
                             for r in receipts],
            }
        )
    return data
