"""The rows of newly accepted messages: built once, kept per recipient against duplicates, inserted in groups.

The job: every way into the queue (an edge's ``QueueStore.enqueue``, the receipts of a worker's
verdict in ``gateway.queue.outcomes``) builds its rows with ``new_message`` and inserts them with
``insert_new`` in the caller's transaction.  ``insert_new`` keeps, for a message with a dedupe
key (a peer's retransmission, a quarantine notice), only the recipients not yet accepted under
that key (``queue_dedupe``), read in the writing transaction.  ``GroupCommit`` lets the threads of
the SMTP edge share one transaction for whatever is waiting (one fsync, one lock).

Errors: database errors are stored in ``NewMessage.error`` for the caller (``GroupCommit``), or
propagate from ``insert_new``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select
from sqlalchemy.orm import Session, sessionmaker

from directory.db import write_connection
from gateway.audit.trail import AuditEvent, append
from gateway.core.errors import QueueError
from gateway.core.states import RecipientState
from gateway.queue.models import QueueDedupe, QueuedMessage, QueuedRecipient
from gateway.queue.spool import Spool

__all__ = ["GroupCommit", "NewMessage", "QueueError", "dedupe_recipient", "insert_new", "new_message"]


@dataclass(eq=False)
class NewMessage:
    """A newly accepted message's rows and/or audit events, then the outcome of writing them."""

    message: dict[str, Any] | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    events: list[AuditEvent] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    #: Per-recipient dedupe: the recipients offered (``recipients`` keeps those not yet accepted
    #: under ``message["dedupe_key"]``, decided anew in each transaction that writes the item).
    offered: list[dict[str, Any]] = field(default_factory=list)
    duplicate_of: str | None = None  # every recipient was already accepted, by this queue id
    #: The message's bytes when the spool keeps them in the database (``Spool.in_database``):
    #: inserted by ``insert_new`` in the same transaction as the rows.  None for spool files.
    data: bytes | None = field(default=None, repr=False)


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

    def __init__(self, factory: Callable[[], sessionmaker[Session]], spool: Spool | None = None) -> None:
        self._factory_of = factory  # asked at each commit: the store's current session factory
        self._spool = spool  # stores the bytes that ride in the transaction (``NewMessage.data``)
        self._cond = threading.Condition()
        self._pending: list[NewMessage] = []
        self._committing = False
        self.commits = 0  # transactions committed (for tests and benchmarks)
        self.items = 0  # members committed

    def run(self, item: NewMessage) -> None:
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

    def _commit(self, batch: list[NewMessage]) -> None:
        factory = self._factory_of()
        if len(batch) > 1 and self._together(factory, batch):
            return
        for it in batch:
            try:
                with write_connection(factory) as conn:
                    insert_new(conn, [it], self._spool)
            except Exception as exc:
                it.error = exc
                it.done = True
            else:
                self._finish([it])

    def _together(self, factory: sessionmaker[Session], batch: list[NewMessage]) -> bool:
        """Commit the whole batch in one transaction; False when it failed (each is then tried alone)."""
        try:
            with write_connection(factory) as conn:
                insert_new(conn, batch, self._spool)
        except Exception:  # one member is at fault (e.g. a known dedupe key): the caller retries each alone
            return False
        self._finish(batch)
        return True

    def _finish(self, members: list[NewMessage]) -> None:
        with self._cond:
            self.commits += 1
            self.items += len(members)
        for it in members:
            it.done = True


def dedupe_recipient(address: str) -> str:
    """The form of an address in ``queue_dedupe`` (domains and our mailboxes are case-blind)."""
    return address.strip().lower()[:320]


def _keep_fresh(conn: Connection, batch: Sequence[NewMessage]) -> list[dict[str, Any]]:
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


def insert_new(conn: Connection, batch: Sequence[NewMessage], spool: Spool | None = None) -> None:
    """Bulk inserts (Core executemany) of the batch's messages, recipients, bytes and audit records.

    The bytes carried in ``NewMessage.data`` go to ``spool`` in this transaction (after their
    message rows, which they reference): accepted with the rows or not at all."""
    dedupe_rows = _keep_fresh(conn, batch)
    messages = [it.message for it in batch if it.message is not None and it.duplicate_of is None]
    if messages:
        conn.execute(_INSERT_MESSAGES, messages)
    if dedupe_rows:
        conn.execute(_INSERT_DEDUPE, dedupe_rows)
    recipients = [r for it in batch if it.duplicate_of is None for r in it.recipients]
    if recipients:
        conn.execute(_INSERT_RECIPIENTS, recipients)
    carried = [(it.message["id"], it.data) for it in batch
               if it.message is not None and it.duplicate_of is None and it.data is not None]  # fmt: skip
    if carried:
        if spool is None:
            raise QueueError("message bytes to store in the database, but no spool to store them")
        spool.insert(conn, carried)
    events = [ev for it in batch if it.duplicate_of is None for ev in it.events]
    if events:
        append(conn, events)


def new_message(queue_id: str, data: bytes, *, sender: str, recipients: Sequence[str], origin: str, now: datetime,
                lifetime: timedelta, lease: timedelta, kind: str = "message", auth_identity: str | None = None,
                client_address: str | None = None, peer_operator: str | None = None, message_id: str | None = None,
                dedupe_key: str | None = None, related_id: str | None = None,
                security: Mapping[str, Any] | None = None, protections: Mapping[str, str] | None = None,
                audit_events: Sequence[AuditEvent] = (), claimed_by: str | None = None,
                riders: Sequence[AuditEvent] = (), carry: bool = False, dsn_envid: str | None = None,
                dsn_ret: str | None = None, dsn_notify: Mapping[str, str] | None = None,
                dsn_orcpt: Mapping[str, str] | None = None) -> NewMessage:  # fmt: skip
    """The rows of a message whose bytes are stored under ``queue_id``: one message row, one row
    per distinct recipient (state ``queued``, the protection decided at RCPT time if any), and
    its audit records (given the queue id); ``riders`` are earlier records committed with it.
    ``carry``: the bytes go in the transaction too (a spool in the database).  ``dsn_*``: the
    sender's DSN parameters (RFC 3461): ENVID and RET on the message, NOTIFY and ORCPT per recipient."""
    events = [
        *riders, *(AuditEvent(**{**ev.__dict__, "queue_id": ev.queue_id or queue_id}) for ev in audit_events)
    ]
    item = NewMessage(
        message={
            "id": queue_id, "created_at": now, "origin": origin, "kind": kind, "sender": sender,
            "auth_identity": auth_identity, "client_address": client_address, "peer_operator": peer_operator,
            "message_id": (message_id or "")[:998] or None, "dedupe_key": dedupe_key, "related_id": related_id,
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "spool_name": queue_id,
            "expires_at": now + lifetime, "warned_at": None, "next_attempt_at": now,
            "claimed_by": claimed_by, "lease_until": now + lease if claimed_by else None, "done": False,
            "parked": False, "purged_at": None, "claim_gen": 0,
            "security": json.dumps(security, sort_keys=True) if security else None,
            "dsn_envid": dsn_envid, "dsn_ret": dsn_ret,
        },
        recipients=[
            {"message_id": queue_id, "address": r, "state": RecipientState.QUEUED, "attempts": 0,
             "protection": (protections or {}).get(r) or None, "last_reply": None, "updated_at": now,
             "dsn_notify": (dsn_notify or {}).get(r), "dsn_orcpt": (dsn_orcpt or {}).get(r)}
            for r in dict.fromkeys(recipients)
        ],
        events=events,
        data=data if carry else None,
    )  # fmt: skip
    item.offered = list(item.recipients)
    return item
