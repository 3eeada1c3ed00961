"""The durable queue: message bytes in a spool folder, envelope and state in the database.

``enqueue`` is the only writer of new messages. It writes the bytes to a
temporary file, fsyncs it, renames it into place and fsyncs the folder (in the
caller's thread, so several messages do this at once), then commits the envelope
rows and the acceptance's audit records. Commits are grouped: one caller at a
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
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Integer, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from directory.db import write_connection
from gateway.audit.trail import AuditEvent, append
from gateway.durable import PRIVATE_DIR_MODE, private_dir, write_durably
from gateway.queue.models import (
    RELEASED,
    QueueDedupe,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    may_move,
)
from gateway.queue.outcomes import fold_state

log = logging.getLogger("mssgw.queue")


class QueueError(Exception):
    """The queue cannot store or find a message; the message says which and why."""


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


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes: they are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(eq=False)
class _Pending:
    """One member of a group commit: a message's rows and/or audit events, then its outcome."""

    message: dict[str, Any] | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    events: list[AuditEvent] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    #: Per-recipient dedupe: the recipients offered (``recipients`` keeps those not yet accepted
    #: under ``message["dedupe_key"]``, decided anew in each transaction that writes the item).
    offered: list[dict[str, Any]] = field(default_factory=list)
    duplicate_of: str | None = None  # every recipient was already accepted, by this queue id


_MESSAGES = cast(Table, QueuedMessage.__table__)
_RECIPIENTS = cast(Table, QueuedRecipient.__table__)
_DEDUPE = cast(Table, QueueDedupe.__table__)
_INSERT_MESSAGES = insert(_MESSAGES)
_INSERT_RECIPIENTS = insert(_RECIPIENTS)
_INSERT_DEDUPE = insert(_DEDUPE)
_DEDUPE_OF = select(_DEDUPE.c.dedupe_key, _DEDUPE.c.recipient, _DEDUPE.c.queue_id).where(
    _DEDUPE.c.dedupe_key.in_(bindparam("keys", expanding=True))
)


class GroupCommit:
    """Serialises database writes of new messages and commits whatever is waiting in one transaction.

    The first caller to find no commit running becomes the committer for everything
    queued so far (its own item included); callers arriving meanwhile wait and are
    taken by the next round. Thread-safe; the callers are the enqueue threads.
    """

    def __init__(self, factory: Callable[[], sessionmaker[Session]]) -> None:
        self._factory_of = factory  # asked at each commit: the store's current session factory
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._committing = False
        self.commits = 0  # transactions committed (for tests and benchmarks)
        self.items = 0  # members committed

    def run(self, item: _Pending) -> None:
        """Returns once ``item`` is committed or has its own error in ``item.error``."""
        with self._cond:
            self._pending.append(item)
            while not item.done and self._committing:
                self._cond.wait()
            if item.done:
                return
            batch, self._pending = self._pending, []
            self._committing = True
        try:
            self._commit(batch)
        finally:
            with self._cond:
                for it in batch:
                    if not it.done:  # interrupted before an outcome: never report success
                        it.error = it.error or QueueError("the commit was interrupted")
                        it.done = True
                self._committing = False
                self._cond.notify_all()

    def _commit(self, batch: list[_Pending]) -> None:
        factory = self._factory_of()
        if len(batch) > 1 and self._together(factory, batch):
            return
        for it in batch:
            try:
                with write_connection(factory) as conn:
                    _write(conn, [it])
            except Exception as exc:
                it.error = exc
                it.done = True
            else:
                self._finish([it])

    def _together(self, factory: sessionmaker[Session], batch: list[_Pending]) -> bool:
        """Commit the whole batch in one transaction; False when it failed (each is then tried alone)."""
        try:
            with write_connection(factory) as conn:
                _write(conn, batch)
        except Exception:  # one member is at fault (e.g. a known dedupe key): the caller retries each alone
            return False
        self._finish(batch)
        return True

    def _finish(self, members: list[_Pending]) -> None:
        with self._cond:
            self.commits += 1
            self.items += len(members)
        for it in members:
            it.done = True


def dedupe_recipient(address: str) -> str:
    """The form of an address in ``queue_dedupe`` (domains and our mailboxes are case-blind)."""
    return address.strip().lower()[:320]


def _dedupe(conn: Connection, batch: Sequence[_Pending]) -> list[dict[str, Any]]:
    """Keep, for each keyed item, the recipients not accepted yet; returns the dedupe rows to insert.

    Read in the writing transaction, so a concurrent copy on another node either committed
    first (its recipients are seen and dropped here) or meets the primary key and is retried.
    """
    keyed = [it for it in batch if it.message is not None and it.message.get("dedupe_key")]
    if not keyed:
        return []
    keys = list({it.message["dedupe_key"] for it in keyed if it.message is not None})
    seen: dict[tuple[str, str], str] = {
        (row[0], row[1]): row[2] for row in conn.execute(_DEDUPE_OF, {"keys": keys})
    }
    rows: list[dict[str, Any]] = []
    for it in keyed:
        assert it.message is not None
        key, queue_id = it.message["dedupe_key"], it.message["id"]
        fresh = [r for r in it.offered if (key, dedupe_recipient(r["address"])) not in seen]
        it.recipients = fresh
        it.duplicate_of = None
        if not fresh:
            it.duplicate_of = next(seen[(key, dedupe_recipient(r["address"]))] for r in it.offered)
            continue
        for r in fresh:
            seen[(key, dedupe_recipient(r["address"]))] = queue_id
            rows.append({"dedupe_key": key, "recipient": dedupe_recipient(r["address"]), "queue_id": queue_id,
                         "created_at": it.message["created_at"]})  # fmt: skip
    return rows


def _write(conn: Connection, batch: Sequence[_Pending]) -> None:
    """Bulk inserts (Core executemany) of the batch's messages, recipients and audit records."""
    dedupe_rows = _dedupe(conn, batch)
    messages = [it.message for it in batch if it.message is not None and it.duplicate_of is None]
    if messages:
        conn.execute(_INSERT_MESSAGES, messages)
    if dedupe_rows:
        conn.execute(_INSERT_DEDUPE, dedupe_rows)
    recipients = [r for it in batch if it.duplicate_of is None for r in it.recipients]
    if recipients:
        conn.execute(_INSERT_RECIPIENTS, recipients)
    events = [ev for it in batch if it.duplicate_of is None for ev in it.events]
    if events:
        append(conn, events)


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
                 lease: timedelta = timedelta(minutes=5)) -> None:
        self._factory = factory
        self.group = GroupCommit(lambda: self._factory)
        self.spool_dir = spool_dir
        self.lifetime = lifetime
        self.lease = lease
        private_dir(spool_dir)  # plaintext of messages waiting: 0700 (files are 0600, write_durably)

    # --- writing ---------------------------------------------------------------------

    def spool_path(self, spool_name: str) -> Path:
        return self.spool_dir / spool_name[:2] / spool_name

    def _write_spool(self, queue_id: str, data: bytes) -> Path:
        final = self.spool_path(queue_id)
        final.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        if final.exists():  # a caller-chosen id already in use: never overwrite stored bytes
            raise FileExistsError(17, "queue id already in use", str(final))
        write_durably(final.with_name(f".{queue_id}.tmp"), final, data)
        return final

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
    ) -> Enqueued:
        """Store the message durably; returns only once bytes and rows are committed.

        ``queue_id`` may be chosen by the caller (``new_queue_id()``) so that a trace
        header written into the bytes can name it; by default a new one is drawn.
        ``claimed_by`` stores the message already leased to that worker (a hand-off: the
        worker of this process takes it from memory, without a claim transaction); if
        that worker dies, the lease expires and any worker claims it as usual.
        ``riders`` are audit records of earlier decisions committed in the same transaction as
        they are (``audit_events`` are this message's and get its queue id).
        """
        if not recipients:
            raise QueueError("a message needs at least one recipient")
        queue_id = queue_id or new_queue_id()
        try:
            path = self._write_spool(queue_id, data)
        except OSError as exc:
            raise QueueError(f"cannot write the spool file ({exc.strerror or exc})") from exc
        now = now_utc()
        events = [
            *riders, *(AuditEvent(**{**ev.__dict__, "queue_id": ev.queue_id or queue_id}) for ev in audit_events)
        ]
        item = _Pending(
            message={
                "id": queue_id, "created_at": now, "origin": origin, "kind": kind, "sender": sender,
                "auth_identity": auth_identity, "client_address": client_address, "peer_operator": peer_operator,
                "message_id": (message_id or "")[:998] or None, "dedupe_key": dedupe_key, "related_id": related_id,
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "spool_name": queue_id,
                "expires_at": now + self.lifetime, "warned_at": None, "next_attempt_at": now,
                "claimed_by": claimed_by, "lease_until": now + self.lease if claimed_by else None, "done": False,
                "parked": False, "purged_at": None, "claim_gen": 0,
                "security": json.dumps(security, sort_keys=True) if security else None,
            },
            recipients=[
                {"message_id": queue_id, "address": r, "state": RecipientState.QUEUED, "attempts": 0,
                 "protection": (protections or {}).get(r), "last_reply": None, "updated_at": now}
                for r in dict.fromkeys(recipients)
            ],
            events=events,
        )  # fmt: skip
        item.offered = list(item.recipients)
        self.group.run(item)
        if isinstance(item.error, IntegrityError) and dedupe_key is not None:
            # Another node accepted a copy for some of these recipients meanwhile: decide again
            # against what it committed (the transaction re-reads the dedupe rows).
            item.done, item.error = False, None
            self.group.run(item)
        error = item.error
        if isinstance(error, IntegrityError):
            path.unlink(missing_ok=True)
            raise QueueError("the queue refused the message (conflict); try again") from None
        if error is not None:
            path.unlink(missing_ok=True)
            raise QueueError(f"the queue database cannot store the message ({type(error).__name__})") from error
        if item.duplicate_of is not None:  # every recipient already accepted: stored nowhere
            path.unlink(missing_ok=True)
            return Enqueued(item.duplicate_of, duplicate=True)
        assert item.message is not None
        return Enqueued(queue_id, row={**item.message, "recipients": item.recipients})

    def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Commit audit records with the next group of messages (one write transaction for both)."""
        if not events:
            return
        item = _Pending(events=list(events))
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
            return self.spool_path(name).read_bytes()
        except OSError as exc:
            raise QueueError(f"spool file of {queue_id} cannot be read ({exc.strerror})") from exc

    def sweep_orphans(self, older_than: float = 3600.0) -> int:
        """Remove spool files with no queue row (a crash before commit; never acknowledged) or
        whose message is finished (a crash between the final commit and ``purge_spool``)."""
        removed = 0
        cutoff = time.time() - older_than
        with self._factory() as session:
            for path in self.spool_dir.glob("*/*"):
                name = path.name.lstrip(".").removesuffix(".tmp")
                msg = None if path.name.endswith(".tmp") else session.get(QueuedMessage, name)
                finished = msg is not None and msg.purged_at is not None
                if not finished and path.stat().st_mtime > cutoff:
                    continue
                if msg is None or finished:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # --- claiming and outcomes --------------------------------------------------------------

    def claim(self, worker: str, *, limit: int = 10, now: datetime | None = None) -> list[str]:
        """Lease up to ``limit`` ready messages to ``worker``; returns their queue ids."""
        return [row["id"] for row in self.claim_rows(worker, limit=limit, now=now)]

    def claim_rows(self, worker: str, *, limit: int = 10, now: datetime | None = None) -> list[dict[str, Any]]:
        """``claim``, returning each claimed message's columns with its ``recipients`` (lists of dicts).

        The worker needs the rows anyway: reading them in the claim's transaction saves a
        query and a thread hop per message.  Three prebuilt statements (the ready ids, the
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
        """Set ``done``/``parked``/``purged_at`` from the recipients; the spool names to remove after commit."""
        cols = fold_state({"purged_at": msg.purged_at}, [{"state": r.state} for r in msg.recipients], now_utc())
        msg.done, msg.parked = cols["done"], cols["parked"]
        if "purged_at" in cols:
            msg.purged_at = cols["purged_at"]
            return [msg.spool_name]
        return []

    def purge_spool(self, spool_names: Sequence[str]) -> None:
        """Remove the bytes of finished messages (their rows already say ``purged_at``).

        Called after the commit that made them final: a crash before this leaves files that
        ``sweep_orphans`` removes; a message whose bytes are gone is never claimable.
        """
        for name in spool_names:
            try:
                self.spool_path(name).unlink(missing_ok=True)
            except OSError as exc:  # left for sweep_orphans
                log.warning("spool file %s could not be removed (%s)", name, exc.strerror)

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

    def retry(self, queue_id: str) -> int:
        """Make deferred (or quarantined-then-released) recipients due now; returns how many."""
        with self._factory() as session, session.begin():
            msg = session.get(QueuedMessage, queue_id)
            if msg is None:
                raise QueueError(f"no message {queue_id} in the queue")
            due = [r for r in msg.recipients if r.state in (RecipientState.DEFERRED, RecipientState.QUEUED)]
            if not due:
                raise QueueError(f"message {queue_id} has no recipient waiting for delivery")
            msg.next_attempt_at = now_utc()
            msg.lease_until = None
            msg.claimed_by = None
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
            msg.next_attempt_at = now_utc()
            msg.claimed_by = None
            msg.lease_until = None
            append(session, [AuditEvent("quarantine-release", "info", queue_id=queue_id, actor=actor,
                                        detail={"recipients": released})])  # fmt: skip
            return released


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
